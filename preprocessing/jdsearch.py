"""Reader of the JDsearch dataset (JD.com personalized product search, SIGIR 2023).

`python -m preprocessing --input-format jdsearch --input DIR` calls `prepare(DIR, work_dir,
options)` once (validation + the text embedding space of preprocessing/text_embeddings.py,
trained on query terms vs clicked product name terms), then applies
`ReadJDsearch(DIR, **prepared)`; the result is the reader contract of preprocessing/records.py.

Only clicks before the pipeline's eval cutoff train the text embedding space: `prepare()`
computes the time cutoffs from the request times (preprocessing/splits.py, with the options'
eval_fraction and test_fraction), so the candidate clicks of eval and test requests and the
history search behaviours at or after T_eval are left out. The space feeds the ranker, so
held-out clicks shaping it would make eval and test metrics optimistic; the history before
T_eval of a held-out user is past information at the cutoff and stays in.

user_behavior_data.txt (tab-separated; the published sample has the header line
`query candidate_wid_list candidate_label_list history_qry_list history_wid_list
history_type_list history_time_list`; a file without it, like the first release's
release_data.txt, is recognised by its content). One line per user, holding that user's test
search request and the history before it:

* ids: the file has no user or request id, so both derive from the physical line number n
  (1-based, header included, so `sed -n <n>p` shows the line): user `u<n>`, request `r<n>`.
  Product ids stay the exact strings of the file (never converted to fixed-width integers).
* query / history queries: term ids joined by 0x18 -> token ids (`term_id`). A history query
  `-1` (or empty) is a behaviour that came from no query: source FEED, otherwise SEARCH.
* history_type_list -> engagement over ENGAGEMENT_NAMES["jdsearch"] = (click, follow, cart,
  order) as cumulative depth (ENGAGEMENT_BY_TYPE): CLICK (1,0,0,0), FLW (1,1,0,0),
  CART (1,1,1,0), ORD (1,1,1,1).
* history_time_list: the gap after the previous behaviour (the first is 0), one more entry than
  the history (the last is the gap to the test query). Times are cumulative from
  BASE_TIME_MS in units of TIME_UNIT_MS (the gaps are seconds): behaviour i happens at
  BASE_TIME_MS + sum(gaps[:i+1]) * TIME_UNIT_MS and the request at BASE + sum(all gaps) * unit.
  The dataset has no absolute clock, so every user's history starts at the same instant.
* candidates keep the order of candidate_wid_list, the order they were shown in (their
  display positions 0, 1, ... go into the examples; metadata.json records display_order).
* candidates and graded labels 0/1/2/3 -> tasks JDSEARCH_TASKS: click (>= 1), cart (>= 2),
  purchase (== 3). Candidates with label >= 1 also become SEARCH behaviours at the request
  time (engagement by label: 1 CLICK, 2 CART, 3 ORD), like search clicks in the canonical
  layout; the point-in-time join keeps them out of that request's own features.
* a line with an empty candidate list is a history-only user: its behaviours are kept, no
  request is made (counted as `lines_without_request`).
* malformed lines (wrong field count, ragged history lists, candidate/label counts that
  differ, unknown behaviour types, bad labels or times, non-UTF-8) go whole to the dead
  letters with the reason and the line number.

product_meta_data.txt (tab-separated, header `wid name brand_id brand_name cate_id_1 ...
shop_id`) -> ItemRecord(author_id = brand_id, categories = ("1:<cate_id_1>", "2:<cate_id_2>"),
tokens = name terms). Products referenced by a line but absent from it still get an ItemRecord with
unknown author and category (counted as `items_without_metadata`); a repeated wid keeps its
first row by text and dead-letters the others (`duplicate_item`).
"""
from __future__ import annotations

import hashlib
import logging
import os
from array import array
from typing import Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

import common  # noqa: F401
from common import features as F
from preprocessing.kuaisar import (DEAD_LETTER, CompleteItems, _save_prepared, normalise_id,
                                   trim_categories)
from preprocessing.records import BehaviourRecord, DeadLetter, ItemRecord, RequestRecord
from preprocessing.splits import request_timestamps_to_cutoffs, split_fractions, split_of

log = logging.getLogger(__name__)

FORMAT = "jdsearch"
METRICS_NAMESPACE = "preprocessing.jdsearch"
TASKS = F.JDSEARCH_TASKS
ENGAGEMENT_NAMES = F.ENGAGEMENT_NAMES[FORMAT]
BASE_TIME_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z, an arbitrary documented anchor
# gaps read as seconds: the README names no unit; gaps like 22967659 (~9 months) fit
TIME_UNIT_MS = 1000
TERM_SEPARATOR = "\x18"
LIST_SEPARATOR = "_"
NO_QUERY = "-1"

BEHAVIOUR_FILES = ("user_behavior_data.txt", "release_data.txt")
PRODUCT_FILES = ("product_meta_data.txt", "product_data.txt")
BEHAVIOUR_COLUMNS = ("query", "candidate_wid_list", "candidate_label_list", "history_qry_list",
                     "history_wid_list", "history_type_list", "history_time_list")
PRODUCT_COLUMNS = ("wid", "name", "brand_id", "brand_name", "cate_id_1", "cate_name_1",
                   "cate_id_2", "cate_name_2", "cate_id_3", "cate_name_3", "cate_id_4",
                   "cate_name_4", "shop_id")
ENGAGEMENT_BY_TYPE = {"CLICK": (1.0, 0.0, 0.0, 0.0), "FLW": (1.0, 1.0, 0.0, 0.0),
                      "CART": (1.0, 1.0, 1.0, 0.0), "ORD": (1.0, 1.0, 1.0, 1.0)}
TYPE_BY_LABEL = {1: "CLICK", 2: "CART", 3: "ORD"}
_INT64_MAX = 2 ** 63 - 1


def term_id(term: str) -> int:
    """Token id of one anonymised term: the decimal value when it fits in int64, otherwise a
    stable 63-bit hash of the text (so a huge or non-numeric term never fails the run)."""
    term = term.strip()
    if term.isdigit():
        value = int(term)
        if value <= _INT64_MAX:
            return value
    return int.from_bytes(hashlib.blake2b(term.encode(), digest_size=8).digest(), "big") \
        & _INT64_MAX


def parse_terms(text: str) -> Tuple[int, ...]:
    return tuple(term_id(t) for t in text.split(TERM_SEPARATOR) if t.strip())


def _split_list(text: str) -> List[str]:
    text = text.strip()
    return text.split(LIST_SEPARATOR) if text else []


def parse_behaviour_line(line_number: int, text: str):
    """One user line -> (RequestRecord or None without query embedding, [BehaviourRecord],
    [(query tokens, clicked wid, time ms)] for the text two-tower: history search behaviours
    and candidate clicks). Raises ValueError(reason)."""
    fields = text.rstrip("\r\n").split("\t")
    if len(fields) != len(BEHAVIOUR_COLUMNS):
        raise ValueError("wrong_field_count")
    query, cand_text, label_text, hq_text, hw_text, ht_text, time_text = fields
    user = f"u{line_number}"
    candidates = [w.strip() for w in _split_list(cand_text)]
    label_values = _split_list(label_text)
    if len(candidates) != len(label_values):
        raise ValueError("candidate_label_length_mismatch")
    grades = []
    for value in label_values:
        try:
            grade = float(value)
        except ValueError:
            raise ValueError("bad_label") from None
        if grade not in (0.0, 1.0, 2.0, 3.0):
            raise ValueError("bad_label")
        grades.append(int(grade))
    history_queries, history_wids = _split_list(hq_text), _split_list(hw_text)
    history_types, gaps_text = _split_list(ht_text), _split_list(time_text)
    n = len(history_wids)
    if len(history_queries) != n or len(history_types) != n:
        raise ValueError("history_length_mismatch")
    if len(gaps_text) != n + 1 and not (n == 0 and not gaps_text):
        raise ValueError("history_time_length_mismatch")
    try:
        gaps = [int(float(g)) for g in gaps_text]
    except ValueError:
        raise ValueError("bad_time") from None
    if any(g < 0 for g in gaps):
        raise ValueError("bad_time")
    if any(not w.strip() for w in history_wids + candidates):
        raise ValueError("empty_product_id")
    types = [t.strip().upper() for t in history_types]
    if any(t not in ENGAGEMENT_BY_TYPE for t in types):
        raise ValueError("unknown_behaviour_type")
    query_tokens = parse_terms(query)

    behaviours, pairs = [], []
    elapsed = 0
    for i in range(n):
        elapsed += gaps[i]
        raw_query = history_queries[i].strip()
        from_query = raw_query not in ("", NO_QUERY)
        wid = history_wids[i].strip()
        time_ms = BASE_TIME_MS + elapsed * TIME_UNIT_MS
        behaviours.append(BehaviourRecord(
            user, wid, time_ms, F.SOURCE_SEARCH if from_query else F.SOURCE_FEED,
            ENGAGEMENT_BY_TYPE[types[i]]))
        if from_query:
            pairs.append((parse_terms(raw_query), wid, time_ms))
    request_time = BASE_TIME_MS + sum(gaps) * TIME_UNIT_MS
    request = None
    if candidates:
        request = RequestRecord(
            f"r{line_number}", user, request_time, query_tokens, None, tuple(candidates),
            {"click": [float(g >= 1) for g in grades], "cart": [float(g >= 2) for g in grades],
             "purchase": [float(g == 3) for g in grades]})
        for wid, grade in zip(candidates, grades):
            if grade >= 1:
                behaviours.append(BehaviourRecord(user, wid, request_time, F.SOURCE_SEARCH,
                                                  ENGAGEMENT_BY_TYPE[TYPE_BY_LABEL[grade]]))
                pairs.append((query_tokens, wid, request_time))
    return request, behaviours, pairs


def parse_product_line(text: str) -> ItemRecord:
    fields = text.rstrip("\r\n").split("\t")
    if len(fields) != len(PRODUCT_COLUMNS):
        raise ValueError("wrong_field_count")
    row = dict(zip(PRODUCT_COLUMNS, fields))
    wid = row["wid"].strip()
    if not wid:
        raise ValueError("missing_id")
    return ItemRecord(wid, normalise_id(row["brand_id"]),
                      trim_categories([normalise_id(row["cate_id_1"]),
                                       normalise_id(row["cate_id_2"])]),
                      None, parse_terms(row["name"]))


# ---- validation and preparation --------------------------------------------------------------
def _find(input_dir: str, names) -> Optional[str]:
    for name in names:
        path = os.path.join(input_dir, name)
        if FileSystems.exists(path):
            return path
    return None


def _first_line(path: str) -> str:
    with FileSystems.open(path) as f:
        first = f.readline()
    try:
        return first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file (is it Parquet or compressed?); "
                         "JDsearch files are tab-separated text") from None


def _has_header(path: str, columns, looks_like_data) -> bool:
    first = _first_line(path)
    fields = [f.strip() for f in first.split("\t")]
    if tuple(fields) == tuple(columns):
        return True
    if len(fields) == len(columns) and looks_like_data(fields):
        return False
    raise ValueError(
        f"{path}: first line is neither the JDsearch header ({' '.join(columns)}) nor a "
        f"{len(columns)}-field tab-separated data line (found {len(fields)} fields: "
        f"{first[:120]!r}); is this really a JDsearch file? For the project's Parquet layout "
        "use --input-format canonical.")


def _behaviour_data_line(fields) -> bool:
    labels = _split_list(fields[2])
    try:
        return all(float(x) in (0.0, 1.0, 2.0, 3.0) for x in labels)
    except ValueError:
        return False


def validate(input_dir: str) -> Dict[str, object]:
    """Finds the two JDsearch files and checks their first line (header or data).

    Returns {"behaviour_path", "behaviour_header", "product_path", "product_header"}; raises
    ValueError with an actionable message before any pipeline work starts.
    """
    behaviour_path = _find(input_dir, BEHAVIOUR_FILES)
    product_path = _find(input_dir, PRODUCT_FILES)
    if behaviour_path is None or product_path is None:
        present = sorted(m.path.rsplit("/", 1)[-1] for m in
                         FileSystems.match([os.path.join(input_dir, "*")])[0].metadata_list)
        missing = BEHAVIOUR_FILES[0] if behaviour_path is None else PRODUCT_FILES[0]
        raise ValueError(
            f"--input-format jdsearch needs {missing} in {input_dir} (found: "
            f"{present or 'nothing'}). Expected {BEHAVIOUR_FILES[0]} and {PRODUCT_FILES[0]} "
            "(tab-separated, as published); for the project's own Parquet layout use "
            "--input-format canonical.")
    return {"behaviour_path": behaviour_path,
            "behaviour_header": _has_header(behaviour_path, BEHAVIOUR_COLUMNS,
                                            _behaviour_data_line),
            "product_path": product_path,
            "product_header": _has_header(product_path, PRODUCT_COLUMNS,
                                          lambda fields: bool(fields[0]))}


def read_numbered_lines(path: str, skip_header: bool) -> Iterable[Tuple[int, bytes]]:
    """(1-based physical line number, raw bytes) of every line, the header excluded."""
    with FileSystems.open(path) as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and skip_header:
                continue
            yield number, raw


def click_pairs(files: Dict[str, object], fractions: Tuple[float, float],
                progress_every: int = 20_000):
    """Training data of the text two-tower: (query tokens, clicked product name tokens) pairs
    with their wids, from the history search behaviours and candidate clicks strictly before
    the eval cutoff T_eval (module docstring); the set of all test-query tokens (held-out ones
    included: they join the vocabulary untrained); counts of what could not be used or was held
    out, and the cutoffs.

    The cutoffs come from the times of the requests ReadJDsearch makes (one per parsable line
    with candidates); `fractions` = (eval_fraction, test_fraction) of the pipeline.
    """
    clicks: List[Tuple[Tuple[int, ...], str]] = []
    click_times = array("q")  # parallel to clicks; 8 bytes a pair (histories are long)
    request_times: List[int] = []
    counts: Dict[str, object] = {"behaviour_lines": 0, "behaviour_lines_unparsable": 0}
    query_tokens = set()
    for number, raw in read_numbered_lines(files["behaviour_path"], files["behaviour_header"]):
        counts["behaviour_lines"] += 1
        if counts["behaviour_lines"] % progress_every == 0:
            log.info("text embeddings: read %d user lines", counts["behaviour_lines"])
        try:
            request, _, pairs = parse_behaviour_line(number, raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            counts["behaviour_lines_unparsable"] += 1
            continue
        if request is not None:
            query_tokens.update(request.query_tokens)
            request_times.append(request.timestamp_ms)
        for query, wid, time_ms in pairs:
            if query:
                clicks.append((query, wid))
                click_times.append(time_ms)
    cutoffs = request_timestamps_to_cutoffs(request_times, *fractions)
    train_clicks = [pair for pair, time_ms in zip(clicks, click_times)
                    if split_of(time_ms, cutoffs) == "train"]
    counts.update(requests=len(request_times),
                  held_out_requests=sum(split_of(t, cutoffs) != "train" for t in request_times),
                  held_out_click_pairs=len(clicks) - len(train_clicks),
                  eval_fraction=fractions[0], test_fraction=fractions[1],
                  split_cutoffs_ms={"eval": cutoffs[0], "test": cutoffs[1]})
    clicks = train_clicks
    names = read_names(files, {w for _, w in clicks})
    pairs = [(q, names[w]) for q, w in clicks if names.get(w)]
    keys = [w for _, w in clicks if names.get(w)]
    counts["click_pairs"] = len(clicks)
    counts["click_pairs_without_name"] = len(clicks) - len(pairs)
    return pairs, keys, query_tokens, counts


def read_names(files: Dict[str, object], wanted) -> Dict[str, Tuple[int, ...]]:
    """Product name tokens of the `wanted` wids (first parsable line of each)."""
    names: Dict[str, Tuple[int, ...]] = {}
    for _, raw in read_numbered_lines(files["product_path"], files["product_header"]):
        try:
            item = parse_product_line(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if item.item_id in wanted and item.item_id not in names:
            names[item.item_id] = item.tokens
    return names


def coengagement_name_pairs(files: Dict[str, object], config, cutoff_ms: int):
    """Item pairs of the text two-tower from co-engagement before the eval cutoff
    (preprocessing/text_embeddings.py, `coengagement_pairs`): the history behaviours that came
    from no query (source FEED) of each user line, deep = deeper than CLICK (FLW, CART, ORD);
    returns (name, name) pairs, the second product's wids, and counts."""
    from preprocessing.text_embeddings import coengagement_pairs

    shallow = ENGAGEMENT_BY_TYPE["CLICK"]
    item_pairs: List[Tuple[str, str]] = []
    for number, raw in read_numbered_lines(files["behaviour_path"], files["behaviour_header"]):
        try:
            _, behaviours, _ = parse_behaviour_line(number, raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        item_pairs += coengagement_pairs(
            ((b.user_id, b.timestamp_ms, b.item_id, float(b.engagement != shallow), False)
             for b in behaviours if b.source == F.SOURCE_FEED),
            config.coengagement_window, cutoff_ms, 0.5, int(config.coengagement_max_gap_s * 1000))
    names = read_names(files, {w for pair in item_pairs for w in pair})
    kept = [(a, b) for a, b in item_pairs if names.get(a) and names.get(b)]
    counts = {"coengagement_item_pairs": len(item_pairs),
              "coengagement_pairs_without_name": len(item_pairs) - len(kept)}
    return [(names[a], names[b]) for a, b in kept], [b for _, b in kept], counts


def prepare(input_dir: str, work_dir: Optional[str], options=None) -> Dict[str, object]:
    """Validates the input and trains the frozen query/item text embedding space on the clicks
    before the eval cutoff (module docstring), plus, with `text_tower_coengagement_share` > 0,
    item pairs of co-engaged history behaviours from no query before the eval cutoff
    (`coengagement_name_pairs`).

    Returns the keyword arguments of ReadJDsearch: `text_encoder`, `query_vocab`, `tasks`,
    `engagement_names`, `display_order` / `display_order_source` (the list order of
    candidate_wid_list is the order shown), `text_tower_stats` (with the held-out counts and
    the cutoffs; also written with text_encoder.npz into work_dir when given). Options (dict
    or argparse namespace) are read as in TextTowerConfig.from_options and
    preprocessing.splits.split_fractions.
    """
    from preprocessing.text_embeddings import TextTowerConfig, train_text_encoder

    files = validate(input_dir)
    config = TextTowerConfig.from_options(options)
    pairs, keys, query_tokens, counts = click_pairs(files, split_fractions(options))
    item_pairs, item_keys = [], []
    if config.uses_coengagement:
        item_pairs, item_keys, co_counts = coengagement_name_pairs(
            files, config, counts["split_cutoffs_ms"]["eval"])
        counts.update(co_counts)
    encoder, stats = train_text_encoder(pairs, config, keys, query_tokens, item_pairs, item_keys)
    stats.update(counts)
    _save_prepared(work_dir, encoder, stats)
    return {"text_encoder": encoder, "query_vocab": encoder.query_vocab(), "tasks": TASKS,
            "engagement_names": ENGAGEMENT_NAMES, "text_tower_stats": stats,
            "display_order": True, "display_order_source": F.DISPLAY_ORDER_SOURCES[FORMAT]}


# ---- Beam ------------------------------------------------------------------------------------
def _counter(name: str):
    return Metrics.counter(METRICS_NAMESPACE, name)


class ParseUserLine(beam.DoFn):
    """(line number, raw bytes) -> requests (main), behaviours, dead letters."""

    BEHAVIOURS = "behaviours"

    def __init__(self, source: str, encoder=None):
        self.source, self.encoder = source, encoder

    def process(self, element):
        number, raw = element
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
                self.source, "not_utf8", f"line {number}: {raw!r}"[:10_000]))
            return
        if not text.strip():
            _counter("blank_lines").inc()
            return
        try:
            request, behaviours, _ = parse_behaviour_line(number, text)
        except ValueError as e:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(
                self.source, str(e), f"line {number}: {text.rstrip(chr(10))}"))
            return
        _counter("history_behaviours").inc(len(behaviours))
        for behaviour in behaviours:
            yield beam.pvalue.TaggedOutput(self.BEHAVIOURS, behaviour)
        if request is None:
            _counter("lines_without_request").inc()
            return
        if self.encoder is not None:
            embedding = self.encoder.encode_query(request.query_tokens)
            if not any(embedding):
                _counter("queries_zero_embedding").inc()
            request = request._replace(query_embedding=embedding)
        _counter("requests").inc()
        if not any(request.labels["click"]):
            _counter("requests_without_positive").inc()
        yield request


class ParseProduct(beam.DoFn):
    def __init__(self, source: str):
        self.source = source

    def process(self, raw: bytes):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(self.source, "not_utf8",
                                                                   repr(raw)))
            return
        if not line.strip():
            _counter("blank_product_lines").inc()
            return
        try:
            item = parse_product_line(line)
        except ValueError as e:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(self.source, str(e), line))
            return
        yield item.item_id, (line, item)


class ReadJDsearch(beam.PTransform):
    """JDsearch directory -> {"items", "users", "behaviours", "requests", "dead_letter"}.

    `users` is empty (the dataset has no user profile). `text_encoder` (from prepare()) embeds
    product names and queries; without it the records carry no embeddings. The other keyword
    arguments are prepare()'s informational outputs.
    """

    def __init__(self, input_dir: str, text_encoder=None, query_vocab=None, tasks=TASKS,
                 engagement_names=ENGAGEMENT_NAMES, text_tower_stats=None, files=None,
                 display_order=True, display_order_source=None):
        super().__init__()
        self.input_dir = input_dir
        self.encoder = text_encoder
        self.files = files or validate(input_dir)

    def expand(self, pbegin):
        files = self.files
        behaviour_name = os.path.basename(files["behaviour_path"])
        product_name = os.path.basename(files["product_path"])
        lines = (pbegin
                 | "BehaviourFile" >> beam.Create([files["behaviour_path"]])
                 | "NumberLines" >> beam.FlatMap(read_numbered_lines,
                                                 files["behaviour_header"])
                 | "SpreadLines" >> beam.Reshuffle())
        parsed = lines | "ParseUserLines" >> beam.ParDo(
            ParseUserLine(behaviour_name, self.encoder)).with_outputs(
                ParseUserLine.BEHAVIOURS, DEAD_LETTER, main="requests")
        behaviours = parsed[ParseUserLine.BEHAVIOURS]
        products = (pbegin
                    | "ReadProducts" >> beam.io.ReadFromText(
                        files["product_path"], skip_header_lines=int(files["product_header"]),
                        coder=beam.coders.BytesCoder())
                    | "ParseProducts" >> beam.ParDo(ParseProduct(product_name)).with_outputs(
                        DEAD_LETTER, main="items"))
        referenced = ((behaviours | "BehaviourItems" >> beam.Map(lambda b: b.item_id),
                       parsed.requests | "CandidateItems" >> beam.FlatMap(
                           lambda r: r.candidate_item_ids))
                      | "FlattenReferenced" >> beam.Flatten())
        items = (products.items, referenced) | "CompleteItems" >> CompleteItems(
            product_name, self.encoder, METRICS_NAMESPACE)
        dead = ((parsed[DEAD_LETTER], products[DEAD_LETTER], items[DEAD_LETTER])
                | "FlattenDeadLetters" >> beam.Flatten())
        return {"items": items.items, "users": pbegin | "NoUsers" >> beam.Create([]),
                "behaviours": behaviours, "requests": parsed.requests, "dead_letter": dead}
