"""Reader of the KuaiSAR dataset (Kuaishou search + recommendation, arXiv 2306.07705).

`python -m preprocessing --input-format kuaisar --input DIR` calls `prepare(DIR, work_dir,
options)` once (it validates the files and trains the text embedding space, see
preprocessing/text_embeddings.py), then applies `ReadKuaiSAR(DIR, **prepared)` to the pipeline
root. The result is the reader contract of preprocessing/records.py.

The text embedding space is trained on the clicks of the search sessions of the TRAIN split
only: `prepare()` builds the requests exactly as the reader does, computes the pipeline's time
cutoffs from their timestamps (preprocessing/splits.py, with the options' eval_fraction and
test_fraction) and drops the clicks of eval and test sessions. The space feeds the ranker, so
held-out clicks shaping it would make eval and test metrics optimistic.
With `text_tower_coengagement_share` > 0 it also adds item pairs of feed co-engagement
(rec_inter.csv: items deeply engaged by one user within a few consecutive feed behaviours,
strictly before the eval cutoff; preprocessing/text_embeddings.py); off by default.

Input files (CSV with a header; columns are found by name, extra columns are ignored):

  rec_inter.csv      clicked feed impressions -> BehaviourRecord(source=FEED)
                     engagement = (watch_ratio, like, follow, forward) (ENGAGEMENT_NAMES["kuaisar"])
                     watch_ratio = playing_time / duration_ms clipped to [0, WATCH_RATIO_CAP]
                     (0 when the duration is missing or 0, counted as `missing_duration`).
                     A row with click = 0 is an item shown in the feed that the user did not
                     open: it is left out of the histories and counted as
                     `feed_impressions_without_click` (not a dead letter: nothing is wrong with
                     it). Keeping it would need a "not clicked" flag, and all ENGAGEMENT_DIM = 4
                     slots are taken; with zero engagement it would read as a watched item.
                     An empty click value is a dead letter (`missing_click`).
  src_inter.csv      one row per item shown in a search session. Rows are grouped by
                     search_session_id into one RequestRecord: candidates = the shown items in
                     the order of their rows in the file, which is the order they were shown
                     (the file has no position column; a session's rows appear in display
                     order). Beam reads the file in parallel bundles and groups rows in no
                     particular order, so every row carries its byte offset in the file
                     (`ReadLinesWithOffsets`) and a session's rows are sorted by it; a
                     candidate's display position is the rank of its row among its request's
                     rows (0-based). An item shown twice is one candidate at its first position,
                     clicked if any row was clicked (its later slot stays a gap in the
                     positions). Label click = click_cnt > 0, query tokens = keyword. Each
                     clicked item also becomes a BehaviourRecord(source=SEARCH) at the session
                     time with engagement all zero (the search log has no watch time or like of
                     the result). A session id whose rows disagree on user, time or keyword
                     becomes one request per (user, time, keyword), with ids `<session>#<k>`
                     (counted); each keeps the display order of its own rows.
  item_features.csv  -> ItemRecord(author_id, categories = ("1:<first level id>",
                     "2:<second level id>"): the level prefix keeps equal ids of two levels apart),
                     tokens = caption token ids, embedding = text embedding of the caption)
  user_features.csv  (optional) -> UserRecord(profile = USER_PROFILE_FIELDS)
  social_network.csv is not read.

Tasks: KuaiSAR's search log only says whether a shown item was clicked, so KuaiSAR requests
carry the single task `common.features.KUAISAR_TASKS` = ("click",). Inventing long-view or
like labels from feed actions on the same item would mostly label noise; `prepare()` returns
`tasks` so the metadata records it.

Items referenced by an action or a session but absent from item_features.csv still get an
ItemRecord (unknown author and category, zero embedding), counted as `items_without_metadata`.
Rows that cannot be parsed go to the dead letters with a reason; counts of everything else
that is unusual are Beam metrics in the namespace METRICS_NAMESPACE.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io import filebasedsource
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

import common  # noqa: F401
from common import features as F
from preprocessing.records import (BehaviourRecord, DeadLetter, ItemRecord, RequestRecord,
                                   UserRecord)
from preprocessing.splits import request_timestamps_to_cutoffs, split_fractions, split_of

log = logging.getLogger(__name__)

FORMAT = "kuaisar"
METRICS_NAMESPACE = "preprocessing.kuaisar"
TASKS = F.KUAISAR_TASKS
ENGAGEMENT_NAMES = F.ENGAGEMENT_NAMES[FORMAT]
WATCH_RATIO_CAP = 3.0  # replays beyond three full views add no information, only scale
DEAD_LETTER = "dead_letter"

REC_INTER, SRC_INTER = "rec_inter.csv", "src_inter.csv"
ITEM_FEATURES, USER_FEATURES = "item_features.csv", "user_features.csv"
REQUIRED_COLUMNS = {
    REC_INTER: ("user_id", "item_id", "playing_time", "duration_ms", "timestamp", "click",
                "like", "follow", "forward"),
    SRC_INTER: ("user_id", "search_session_id", "search_session_timestamp", "keyword", "item_id",
                "click_cnt"),
    ITEM_FEATURES: ("item_id", "caption", "author_id", "first_level_category_id",
                    "second_level_category_id"),
    USER_FEATURES: ("user_id", "search_active_level", "rec_active_level", "onehot_feat1",
                    "onehot_feat2"),
}
OPTIONAL_FILES = (USER_FEATURES,)
USER_PROFILE_FIELDS = REQUIRED_COLUMNS[USER_FEATURES][1:]
_MISSING = {"", "nan", "none", "null", "\\n"}
_INTEGRAL_FLOAT = re.compile(r"^(-?\d+)\.0*$")


# ---- value parsing (pure functions, shared with the JDsearch reader) -------------------------
def normalise_id(value: Optional[str]) -> str:
    """Raw id as a string: trimmed, "" when missing, "12.0" (pandas float columns) -> "12".

    Never converted to a fixed-width integer, so 20-digit ids survive exactly.
    """
    if value is None:
        return ""
    value = value.strip()
    if value.lower() in _MISSING:
        return ""
    match = _INTEGRAL_FLOAT.match(value)
    return match.group(1) if match else value


def parse_int(value: str, what: str) -> int:
    """Integer from "123" or "123.0"; ValueError naming `what` otherwise."""
    value = value.strip()
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"bad_{what}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"bad_{what}")
    return int(number)


def parse_float(value: str, what: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise ValueError(f"bad_{what}") from None
    if not math.isfinite(number):
        raise ValueError(f"bad_{what}")
    return number


def parse_flag(value: str, what: str) -> float:
    """0/1 from a count or flag column (missing -> 0)."""
    if value.strip().lower() in _MISSING:
        return 0.0
    return 1.0 if parse_float(value, what) > 0 else 0.0


def parse_token_list(value: Optional[str], what: str) -> Tuple[int, ...]:
    """Token ids from "[20, 34, 3]" (also "['20', '34']", "20 34 3"; "[]" or missing -> ())."""
    if value is None or value.strip().lower() in _MISSING:
        return ()
    body = value.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    parts = [p.strip("'\"") for p in re.split(r"[,\s]+", body) if p]
    try:
        return tuple(parse_int(p, what) for p in parts)
    except ValueError:
        raise ValueError(f"bad_{what}") from None


def _counter(name: str):
    return Metrics.counter(METRICS_NAMESPACE, name)


# ---- validation and preparation --------------------------------------------------------------
def read_header(path: str) -> List[str]:
    with FileSystems.open(path) as f:
        first = f.readline()
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 CSV file (is it Parquet or compressed?); "
                         "KuaiSAR files are plain CSV with a header line") from None
    return [c.strip() for c in next(csv.reader([text.rstrip("\r\n")]), [])]


def validate(input_dir: str) -> Dict[str, List[str]]:
    """Checks that the KuaiSAR files exist and have the published columns.

    Returns {file name: header columns} for the files present. Raises ValueError with what is
    missing and what was found, before any pipeline work starts.
    """
    headers: Dict[str, List[str]] = {}
    for name, required in REQUIRED_COLUMNS.items():
        path = os.path.join(input_dir, name)
        if not FileSystems.exists(path):
            if name in OPTIONAL_FILES:
                log.info("%s not found: users get no profile features", path)
                continue
            present = sorted(m.path.rsplit("/", 1)[-1] for m in
                             FileSystems.match([os.path.join(input_dir, "*")])[0].metadata_list)
            raise ValueError(
                f"--input-format kuaisar needs {name} in {input_dir} "
                f"(found: {present or 'nothing'}). "
                f"Expected the KuaiSAR CSV files {sorted(REQUIRED_COLUMNS)}; "
                "for the project's own Parquet layout use --input-format canonical.")
        header = read_header(path)
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: header lacks the KuaiSAR columns {missing} "
                             f"(header has {header[:20]}); is this really a KuaiSAR file?")
        duplicated = sorted({c for c in header if header.count(c) > 1 and c in required})
        if duplicated:
            raise ValueError(f"{path}: columns {duplicated} appear more than once in the header")
        headers[name] = header
    return headers


def split_csv_line(raw: bytes, header: Sequence[str]) -> Optional[Tuple[Dict[str, str], str]]:
    """One raw line (without its newline) -> ({column: field}, decoded line); None for a blank
    line; ValueError("not_utf8" / "wrong_field_count"). Shared by prepare() and the Beam pass
    so that both see the same rows."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not_utf8") from None
    if not line.strip():
        return None
    try:
        fields = next(csv.reader([line]))
    except csv.Error:
        fields = None
    if fields is None or len(fields) != len(header):
        raise ValueError("wrong_field_count")
    return dict(zip(header, fields)), line


def _iter_csv(path: str, header: Sequence[str]) -> Iterable[Dict[str, str]]:
    """Rows of a CSV file as dicts (plain Python, for prepare()), line by line as Beam's
    ReadFromText splits them; malformed rows are skipped here because the Beam pass
    dead-letters them with their reason."""
    with FileSystems.open(path) as f:
        for number, raw in enumerate(f):
            if number == 0:
                continue  # header
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            try:
                parsed = split_csv_line(raw, header)
            except ValueError:
                continue
            if parsed is not None:
                yield parsed[0]


def parse_search_row(row: Dict[str, str]):
    """src_inter row -> (session id, (user, timestamp, keyword tokens, item, clicked));
    ValueError(reason) when unusable."""
    user, item = normalise_id(row["user_id"]), normalise_id(row["item_id"])
    session = normalise_id(row["search_session_id"])
    if not user or not item or not session:
        raise ValueError("missing_id")
    timestamp = parse_int(row["search_session_timestamp"], "search_session_timestamp")
    keyword = parse_token_list(row["keyword"], "keyword")
    clicked = parse_flag(row["click_cnt"], "click_cnt")
    return session, (user, timestamp, keyword, item, clicked)


def click_pairs(input_dir: str, headers: Dict[str, List[str]],
                fractions: Tuple[float, float], progress_every: int = 1_000_000):
    """Training data of the text two-tower: (keyword tokens, clicked item caption tokens) pairs
    of the TRAIN-split search sessions and their item ids, from src_inter and item_features;
    the set of all keyword tokens (held-out ones included: they join the vocabulary untrained);
    counts of what could not be used or was held out, and the cutoffs.

    The requests are those BuildSearchRequests makes (one per session and (user, time,
    keyword)); the pipeline rejects those with a negative time, so they do not count towards
    the cutoffs. `fractions` = (eval_fraction, test_fraction) of the pipeline.
    """
    clicks: List[Tuple[int, Tuple[int, ...], str]] = []
    requests = set()
    counts: Dict[str, object] = {"search_rows": 0, "click_rows": 0, "search_rows_unparsable": 0}
    query_tokens = set()
    for n, row in enumerate(_iter_csv(os.path.join(input_dir, SRC_INTER), headers[SRC_INTER]), 1):
        counts["search_rows"] += 1
        if n % progress_every == 0:
            log.info("text embeddings: read %d search rows", n)
        try:
            session, (user, timestamp, keyword, item, clicked) = parse_search_row(row)
        except ValueError:
            counts["search_rows_unparsable"] += 1
            continue
        query_tokens.update(keyword)
        requests.add((session, user, timestamp, keyword))
        if not clicked:
            continue
        counts["click_rows"] += 1
        if keyword:
            clicks.append((timestamp, keyword, item))
    cutoffs = request_timestamps_to_cutoffs([r[2] for r in requests if r[2] >= 0], *fractions)
    held_out = sum(split_of(r[2], cutoffs) != "train" for r in requests)
    train_clicks = [(keyword, item) for timestamp, keyword, item in clicks
                    if split_of(timestamp, cutoffs) == "train"]
    counts.update(requests=len(requests), held_out_requests=held_out,
                  held_out_click_pairs=len(clicks) - len(train_clicks),
                  eval_fraction=fractions[0], test_fraction=fractions[1],
                  split_cutoffs_ms={"eval": cutoffs[0], "test": cutoffs[1]})
    clicks = train_clicks
    captions = read_captions(input_dir, headers, {item for _, item in clicks})
    pairs = [(q, captions[i]) for q, i in clicks if captions.get(i)]
    keys = [i for _, i in clicks if captions.get(i)]
    counts["click_pairs_without_caption"] = len(clicks) - len(pairs)
    return pairs, keys, query_tokens, counts


def feed_engagements(input_dir: str, headers: Dict[str, List[str]]):
    """(user, timestamp, item, watch ratio, liked) of every clicked feed impression of
    rec_inter, the watch ratio as ParseFeedAction computes it; unparsable rows are skipped
    (the pipeline sends them to the dead letters)."""
    for row in _iter_csv(os.path.join(input_dir, REC_INTER), headers[REC_INTER]):
        try:
            user, item = normalise_id(row["user_id"]), normalise_id(row["item_id"])
            if not user or not item or parse_flag(row["click"], "click") <= 0:
                continue
            timestamp = parse_int(row["timestamp"], "timestamp")
            playing, duration = (parse_float(row[c], c) if row[c].strip().lower() not in _MISSING
                                 else 0.0 for c in ("playing_time", "duration_ms"))
            liked = parse_flag(row["like"], "like") > 0
        except ValueError:
            continue
        ratio = min(max(playing, 0.0) / duration, WATCH_RATIO_CAP) if duration > 0 else 0.0
        yield user, timestamp, item, ratio, liked


def read_captions(input_dir: str, headers: Dict[str, List[str]],
                  wanted) -> Dict[str, Tuple[int, ...]]:
    """Caption tokens of the `wanted` item ids (first parsable row of each)."""
    captions: Dict[str, Tuple[int, ...]] = {}
    for row in _iter_csv(os.path.join(input_dir, ITEM_FEATURES), headers[ITEM_FEATURES]):
        item = normalise_id(row["item_id"])
        if item in wanted and item not in captions:
            try:
                captions[item] = parse_token_list(row["caption"], "caption")
            except ValueError:
                continue
    return captions


def coengagement_caption_pairs(input_dir: str, headers: Dict[str, List[str]], config,
                               cutoff_ms: int):
    """Item pairs of the text two-tower from feed co-engagement before the eval cutoff
    (preprocessing/text_embeddings.py, `coengagement_pairs`): (caption, caption) pairs, the
    second item's ids, and counts."""
    from preprocessing.text_embeddings import coengagement_pairs

    item_pairs = coengagement_pairs(
        feed_engagements(input_dir, headers), config.coengagement_window, cutoff_ms,
        config.coengagement_min_watch_ratio, int(config.coengagement_max_gap_s * 1000))
    captions = read_captions(input_dir, headers, {i for pair in item_pairs for i in pair})
    kept = [(a, b) for a, b in item_pairs if captions.get(a) and captions.get(b)]
    counts = {"coengagement_item_pairs": len(item_pairs),
              "coengagement_pairs_without_caption": len(item_pairs) - len(kept)}
    return [(captions[a], captions[b]) for a, b in kept], [b for _, b in kept], counts


def prepare(input_dir: str, work_dir: Optional[str], options=None) -> Dict[str, object]:
    """Validates the input and trains the frozen query/item text embedding space on the clicks
    of the train-split sessions (module docstring), plus, with `text_tower_coengagement_share`
    > 0, item pairs of feed co-engagement before the eval cutoff (rec_inter.csv).

    Returns the keyword arguments of ReadKuaiSAR: `text_encoder` (TextEncoder),
    `query_vocab` (token_id, word, embedding columns for the feature store), `tasks`,
    `engagement_names`, `display_order` / `display_order_source` (src_inter's row order
    within a session is the order shown) and `text_tower_stats` (which also records the
    held-out counts and the cutoffs). Writes text_encoder.npz and text_tower_stats.json into
    work_dir when given. Options (dict or argparse namespace) are read as in
    TextTowerConfig.from_options and preprocessing.splits.split_fractions.
    """
    from preprocessing.text_embeddings import TextTowerConfig, train_text_encoder

    headers = validate(input_dir)
    config = TextTowerConfig.from_options(options)
    pairs, keys, query_tokens, counts = click_pairs(input_dir, headers, split_fractions(options))
    item_pairs, item_keys = [], []
    if config.uses_coengagement:
        item_pairs, item_keys, co_counts = coengagement_caption_pairs(
            input_dir, headers, config, counts["split_cutoffs_ms"]["eval"])
        counts.update(co_counts)
    encoder, stats = train_text_encoder(pairs, config, keys, query_tokens, item_pairs, item_keys)
    stats.update(counts)
    _save_prepared(work_dir, encoder, stats)
    return {"text_encoder": encoder, "query_vocab": encoder.query_vocab(), "tasks": TASKS,
            "engagement_names": ENGAGEMENT_NAMES, "text_tower_stats": stats,
            "display_order": True, "display_order_source": F.DISPLAY_ORDER_SOURCES[FORMAT]}


def _save_prepared(work_dir, encoder, stats) -> None:
    if not work_dir:
        return
    import tensorflow as tf

    tf.io.gfile.makedirs(work_dir)
    encoder.save(os.path.join(work_dir, "text_encoder.npz"))
    with tf.io.gfile.GFile(os.path.join(work_dir, "text_tower_stats.json"), "w") as f:
        f.write(json.dumps(stats, indent=2, sort_keys=True, default=float))


# ---- Beam DoFns ------------------------------------------------------------------------------
class _LinesWithOffsetsSource(filebasedsource.FileBasedSource):
    """Lines of text files as (file name, byte offset of the line, raw line without its
    newline), the first `skip_header_lines` lines of each file left out. Splittable like
    ReadFromText (uncompressed files): a line belongs to the bundle whose range holds its first
    byte, so every line is read exactly once whatever the split."""

    def __init__(self, file_pattern: str, skip_header_lines: int = 1, min_bundle_size: int = 0):
        super().__init__(file_pattern, min_bundle_size=min_bundle_size)
        self.skip_header_lines = skip_header_lines

    def read_records(self, file_name, range_tracker):
        start = range_tracker.start_position()
        with self.open_file(file_name) as f:
            position = 0
            for _ in range(self.skip_header_lines):
                position += len(f.readline())
            if start > position:  # the line holding byte start - 1 belongs to the range before
                f.seek(start - 1)
                position = start - 1 + len(f.readline())
            while range_tracker.try_claim(position):
                raw = f.readline()
                if not raw:
                    return
                offset, position = position, position + len(raw)
                raw = raw[:-1] if raw.endswith(b"\n") else raw
                yield file_name, offset, raw[:-1] if raw.endswith(b"\r") else raw


class ReadLinesWithOffsets(beam.PTransform):
    """Text file(s) -> (file name, byte offset, raw line bytes): the lines of ReadFromText
    (header skipped) with where they were in the file, so a later step can restore the file's
    row order after Beam's parallel reads and shuffles."""

    def __init__(self, file_pattern: str, skip_header_lines: int = 1, min_bundle_size: int = 0):
        super().__init__()
        self.source = _LinesWithOffsetsSource(file_pattern, skip_header_lines, min_bundle_size)

    def expand(self, pbegin):
        return pbegin | beam.io.Read(self.source)


class ParseCsvRows(beam.DoFn):
    """CSV line -> (dict by header name, line); wrong field counts go to the dead letters.

    With `with_order`, the input is (file name, byte offset, raw line) from
    ReadLinesWithOffsets and the output (dict, line, (file name, offset)).
    """

    def __init__(self, source: str, header: Sequence[str], with_order: bool = False):
        self.source, self.header, self.with_order = source, list(header), with_order

    def process(self, raw):
        order = None
        if self.with_order:
            file_name, offset, raw = raw
            order = (file_name, offset)
        try:
            parsed = split_csv_line(raw, self.header)
        except ValueError as e:
            text = raw.decode("utf-8") if str(e) == "wrong_field_count" else repr(raw)
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(self.source, str(e), text))
            return
        if parsed is None:
            _counter(f"{self.source}:blank_lines").inc()
            return
        yield parsed + (order,) if self.with_order else parsed


class ParseFeedAction(beam.DoFn):
    """rec_inter row -> BehaviourRecord(source=FEED) when the impression was clicked; an
    unclicked impression is only counted (module docstring)."""

    def process(self, element):
        row, line = element
        try:
            user, item = normalise_id(row["user_id"]), normalise_id(row["item_id"])
            if not user or not item:
                raise ValueError("missing_id")
            timestamp = parse_int(row["timestamp"], "timestamp")
            playing = parse_float(row["playing_time"], "playing_time") \
                if row["playing_time"].strip().lower() not in _MISSING else 0.0
            duration = parse_float(row["duration_ms"], "duration_ms") \
                if row["duration_ms"].strip().lower() not in _MISSING else 0.0
            like, follow, forward = (parse_flag(row[c], c) for c in ("like", "follow", "forward"))
            if row["click"].strip().lower() in _MISSING:
                raise ValueError("missing_click")
            clicked = parse_flag(row["click"], "click") > 0
        except ValueError as e:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(REC_INTER, str(e), line))
            return
        if not clicked:
            _counter("feed_impressions_without_click").inc()
            return
        if duration > 0:
            ratio = max(playing, 0.0) / duration
            if ratio > WATCH_RATIO_CAP:
                _counter("watch_ratio_clipped").inc()
            ratio = min(ratio, WATCH_RATIO_CAP)
        else:
            _counter("missing_duration").inc()
            ratio = 0.0
        _counter("feed_behaviours").inc()
        yield BehaviourRecord(user, item, timestamp, F.SOURCE_FEED,
                              (float(ratio), like, follow, forward))


class ParseSearchRow(beam.DoFn):
    """(src_inter row, line, row order) -> (session id, (row order, user, timestamp, keyword
    tokens, item, clicked)); the row order is (file name, byte offset of the row)."""

    def process(self, element):
        row, line, order = element
        try:
            session, values = parse_search_row(row)
        except ValueError as e:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(SRC_INTER, str(e), line))
            return
        yield session, (order,) + values


class BuildSearchRequests(beam.DoFn):
    """One search session -> RequestRecord(s) + SEARCH behaviours for its clicked items.

    Rows arrive in any order (parallel reads, GroupByKey); they are put back in file order by
    their row order key, which is the order the items were shown in (module docstring).
    """

    BEHAVIOURS = "search_behaviours"

    def __init__(self, encoder=None):
        self.encoder = encoder

    def process(self, element):
        session, rows = element
        # key -> {item: [display position, clicked]}, items in the order first shown
        groups: Dict[Tuple[str, int, Tuple[int, ...]], Dict[str, List]] = {}
        shown_rows: Dict[Tuple[str, int, Tuple[int, ...]], int] = {}
        for _, user, timestamp, keyword, item, clicked in sorted(rows, key=lambda r: r[0]):
            key = (user, timestamp, keyword)
            shown = groups.setdefault(key, {})
            position = shown_rows[key] = shown_rows.get(key, -1) + 1
            if item in shown:
                _counter("duplicate_candidates_merged").inc()
                shown[item][1] = max(shown[item][1], clicked)
            else:
                shown[item] = [position, clicked]
        if len(groups) > 1:
            _counter("sessions_split").inc()
        zero_engagement = (0.0,) * F.ENGAGEMENT_DIM
        for k, key in enumerate(sorted(groups)):
            user, timestamp, keyword = key
            items = list(groups[key])  # display order
            clicks = [groups[key][i][1] for i in items]
            positions = tuple(groups[key][i][0] for i in items)
            if positions == tuple(range(len(items))):
                positions = None  # the list index is the display position
            embedding = None
            if self.encoder is not None:
                embedding = self.encoder.encode_query(keyword)
                if not any(embedding):
                    _counter("queries_zero_embedding").inc()
            request_id = session if len(groups) == 1 else f"{session}#{k}"
            _counter("requests").inc()
            if any(clicks):
                _counter("requests_with_click").inc()
            yield RequestRecord(request_id, user, timestamp, keyword, embedding, tuple(items),
                                {"click": clicks}, candidate_positions=positions)
            for item, clicked in zip(items, clicks):
                if clicked:
                    yield beam.pvalue.TaggedOutput(self.BEHAVIOURS, BehaviourRecord(
                        user, item, timestamp, F.SOURCE_SEARCH, zero_engagement))


class ParseItemFeatures(beam.DoFn):
    """item_features row -> (item id, (raw line, ItemRecord without embedding))."""

    def process(self, element):
        row, line = element
        try:
            item = normalise_id(row["item_id"])
            if not item:
                raise ValueError("missing_id")
            caption = parse_token_list(row["caption"], "caption")
        except ValueError as e:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(ITEM_FEATURES, str(e), line))
            return
        categories = trim_categories([normalise_id(row["first_level_category_id"]),
                                      normalise_id(row["second_level_category_id"])])
        yield item, (line, ItemRecord(item, normalise_id(row["author_id"]), categories, None,
                                      caption))


def trim_categories(levels: Sequence[str]) -> Tuple[str, ...]:
    """Category ids coarse to fine as "<level>:<id>" (level 1 = coarsest), so that equal ids of
    different levels stay different entries of the core's one shared category vocabulary;
    trailing unknown levels dropped, inner ones kept as ""."""
    levels = [f"{k}:{c}" if c else "" for k, c in
              enumerate(list(levels)[:F.NUM_CATEGORY_LEVELS], start=1)]
    while levels and not levels[-1]:
        levels.pop()
    return tuple(levels)


class ResolveItems(beam.DoFn):
    """Joins item metadata with the item ids the actions and sessions reference.

    One ItemRecord per id: its metadata row (the first by raw text when the id appears more
    than once, the others go to the dead letters as `duplicate_item`), or a bare record with
    unknown author/category when only referenced (counted as `items_without_metadata`). The
    embedding is the text embedding of the item's tokens (zero vector when none is known).
    """

    def __init__(self, source: str, encoder=None, namespace: str = METRICS_NAMESPACE):
        self.source, self.encoder, self.namespace = source, encoder, namespace

    def process(self, element):
        item_id, grouped = element
        metadata = sorted(grouped["metadata"])
        if metadata:
            record = metadata[0][1]
            for line, _ in metadata[1:]:
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
                    self.source, "duplicate_item", line))
        else:
            Metrics.counter(self.namespace, "items_without_metadata").inc()
            record = ItemRecord(item_id, "", (), None, ())
        if self.encoder is not None:
            embedding = self.encoder.encode_tuple(record.tokens)
            if not any(embedding):
                Metrics.counter(self.namespace, "items_zero_embedding").inc()
            record = record._replace(embedding=embedding)
        Metrics.counter(self.namespace, "items").inc()
        yield record


class CompleteItems(beam.PTransform):
    """(item id, (raw line, ItemRecord)) metadata + referenced item ids -> items, dead letters."""

    def __init__(self, source: str, encoder=None, namespace: str = METRICS_NAMESPACE):
        super().__init__()
        self.source, self.encoder, self.namespace = source, encoder, namespace

    def expand(self, inputs):
        metadata, referenced = inputs
        refs = (referenced | "DistinctReferenced" >> beam.Distinct()
                | "KeyReferenced" >> beam.Map(lambda item: (item, None)))
        return ({"metadata": metadata, "referenced": refs}
                | "JoinItems" >> beam.CoGroupByKey()
                | "ResolveItems" >> beam.ParDo(ResolveItems(
                    self.source, self.encoder, self.namespace)).with_outputs(
                        DEAD_LETTER, main="items"))


class ResolveUsers(beam.DoFn):
    def process(self, element):
        user, rows = element
        rows = sorted(rows)
        for line, _ in rows[1:]:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
                USER_FEATURES, "duplicate_user", line))
        yield rows[0][1]


def _parse_user(element):
    row, line = element
    user = normalise_id(row["user_id"])
    if not user:
        return [beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(USER_FEATURES, "missing_id",
                                                                 line))]
    profile = tuple(normalise_id(row[c]) for c in USER_PROFILE_FIELDS)
    return [(user, (line, UserRecord(user, profile)))]


class ReadKuaiSAR(beam.PTransform):
    """KuaiSAR CSV directory -> {"items", "users", "behaviours", "requests", "dead_letter"}.

    `text_encoder` (from prepare()) embeds captions and keywords; without it the records carry
    no embeddings (embedding=None). The other keyword arguments are prepare()'s informational
    outputs and are accepted so that `ReadKuaiSAR(input_dir, **prepare(...))` works.
    """

    def __init__(self, input_dir: str, text_encoder=None, query_vocab=None, tasks=TASKS,
                 engagement_names=ENGAGEMENT_NAMES, text_tower_stats=None, headers=None,
                 display_order=True, display_order_source=None, min_bundle_size: int = 0):
        super().__init__()
        self.input_dir = input_dir
        self.encoder = text_encoder
        self.headers = headers or validate(input_dir)
        self.min_bundle_size = min_bundle_size  # tests: small bundles split the files

    def _rows(self, pbegin, name: str, with_order: bool = False):
        """Parsed rows of one file; `with_order` adds each row's place in the file."""
        label = name.split(".")[0]
        path = os.path.join(self.input_dir, name)
        read = (ReadLinesWithOffsets(path, 1, self.min_bundle_size) if with_order else
                beam.io.ReadFromText(path, skip_header_lines=1, coder=beam.coders.BytesCoder(),
                                     min_bundle_size=self.min_bundle_size))
        return (pbegin
                | f"Read_{label}" >> read
                | f"Split_{label}" >> beam.ParDo(ParseCsvRows(name, self.headers[name],
                                                              with_order=with_order))
                .with_outputs(DEAD_LETTER, main="rows"))

    def expand(self, pbegin):
        dead = []
        rec = self._rows(pbegin, REC_INTER)
        feed = rec.rows | "ParseFeedActions" >> beam.ParDo(ParseFeedAction()).with_outputs(
            DEAD_LETTER, main="behaviours")
        src = self._rows(pbegin, SRC_INTER, with_order=True)
        search = src.rows | "ParseSearchRows" >> beam.ParDo(ParseSearchRow()).with_outputs(
            DEAD_LETTER, main="rows")
        sessions = (search.rows | "GroupSessions" >> beam.GroupByKey()
                    | "BuildRequests" >> beam.ParDo(BuildSearchRequests(self.encoder))
                    .with_outputs(BuildSearchRequests.BEHAVIOURS, main="requests"))
        behaviours = ((feed.behaviours, sessions[BuildSearchRequests.BEHAVIOURS])
                      | "FlattenBehaviours" >> beam.Flatten())
        item_rows = self._rows(pbegin, ITEM_FEATURES)
        metadata = item_rows.rows | "ParseItems" >> beam.ParDo(ParseItemFeatures()).with_outputs(
            DEAD_LETTER, main="items")
        referenced = ((behaviours | "BehaviourItems" >> beam.Map(lambda b: b.item_id),
                       sessions.requests | "CandidateItems" >> beam.FlatMap(
                           lambda r: r.candidate_item_ids))
                      | "FlattenReferenced" >> beam.Flatten())
        items = (metadata.items, referenced) | "CompleteItems" >> CompleteItems(
            ITEM_FEATURES, self.encoder)
        dead += [rec[DEAD_LETTER], feed[DEAD_LETTER], src[DEAD_LETTER], search[DEAD_LETTER],
                 item_rows[DEAD_LETTER], metadata[DEAD_LETTER], items[DEAD_LETTER]]
        if USER_FEATURES in self.headers:
            user_rows = self._rows(pbegin, USER_FEATURES)
            parsed = user_rows.rows | "ParseUsers" >> beam.FlatMap(_parse_user).with_outputs(
                DEAD_LETTER, main="users")
            users = (parsed.users | "GroupUsers" >> beam.GroupByKey()
                     | "ResolveUsers" >> beam.ParDo(ResolveUsers()).with_outputs(
                         DEAD_LETTER, main="users"))
            dead += [user_rows[DEAD_LETTER], parsed[DEAD_LETTER], users[DEAD_LETTER]]
            users = users.users
        else:
            users = pbegin | "NoUsers" >> beam.Create([])
        return {"items": items.items, "users": users, "behaviours": behaviours,
                "requests": sessions.requests,
                "dead_letter": tuple(dead) | "FlattenDeadLetters" >> beam.Flatten()}
