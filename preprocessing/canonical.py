"""Reader of the canonical raw-log layout (docs/ARCHITECTURE.md section 1).

`validate(input_dir)` runs before Beam starts and fails fast on an unusable input (a missing
file, a missing column, a directory of another format); `ReadCanonical(input_dir, info)` turns
the Parquet rows into the records of preprocessing/records.py. A row that cannot be used
(null or unparseable value, NaN or wrong-size embedding, negative timestamp or duration,
candidate / label length mismatch) becomes a DeadLetter with its reason; the rest of the run goes
on. Unknown items, duplicates and everything that needs the whole dataset are checked by the
core pipeline (preprocessing/pipeline.py).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import apache_beam as beam

import common  # noqa: F401
from common import features as F
from preprocessing.records import (BehaviourRecord, DeadLetter, ItemRecord, RequestRecord,
                                   UserRecord)

FORMAT = "canonical"
DEAD_LETTER = "dead_letter"
ITEMS, USERS, BEHAVIOURS, REQUESTS, QUERY_VOCAB = (
    "items.parquet", "users.parquet", "behaviours.parquet", "requests.parquet",
    "query_vocab.parquet")
REQUIRED_COLUMNS = {
    ITEMS: ("item_id", "author_id", "category_l1", "category_l2", "duration_s", "embedding"),
    USERS: ("user_id", "age_bucket", "gender", "activity_level", "city_tier"),
    BEHAVIOURS: ("user_id", "item_id", "timestamp", "source", "watch_ratio", "play_time_s",
                 "like", "follow", "share"),
    REQUESTS: ("request_id", "user_id", "timestamp", "query_tokens", "query_embedding",
               "candidate_item_ids", "click", "long_view", "like"),
}
QUERY_VOCAB_COLUMNS = ("token_id", "word", "embedding")
PROFILE_FIELDS = REQUIRED_COLUMNS[USERS][1:]
TASKS = F.TASKS_BY_FORMAT[FORMAT]
# requests.parquet column of each task's labels and of its true value (generated data only);
# the optional `play_time_s` column adds the watch-time task (F.WATCH_TIME_TASKS).
LABEL_COLUMNS = dict({task: task for task in TASKS}, **{F.WATCH_TIME: "play_time_s"})
TRUE_PROB_COLUMNS = dict({task: f"p_{task}" for task in TASKS},
                         **{F.WATCH_TIME: "expected_play_time_s"})


class InputError(ValueError):
    """The input as a whole is unusable; the message says what is wrong and how to fix it."""


def _path(input_dir: str, name: str) -> str:
    return os.path.join(input_dir, name)


def _schema(path: str):
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path) as f:
            return pq.read_schema(f)
    except Exception as exc:  # noqa: BLE001  (any read failure means: not our Parquet file)
        raise InputError(f"{path} is not a readable Parquet file ({exc}); the canonical layout "
                         "is described in docs/ARCHITECTURE.md section 1") from exc


def _first_embedding_dim(path: str, column: str) -> Optional[int]:
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        reader = pq.ParquetFile(f)
        for batch in reader.iter_batches(batch_size=256, columns=[column]):
            for value in batch.column(0).to_pylist():
                if value:
                    return len(value)
    return None


def validate(input_dir: str, embedding_dim: Optional[int] = None) -> Dict[str, Any]:
    """Checks files and columns; returns what the pipeline needs to know before it starts:
    embedding_dim, tasks (with watch time when requests carry `play_time_s`),
    has_true_probabilities, has_query_vocab."""
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(input_dir):
        raise InputError(f"input directory {input_dir} does not exist")
    missing = [n for n in REQUIRED_COLUMNS if not FileSystems.exists(_path(input_dir, n))]
    if missing:
        present = sorted(os.path.basename(m.path) for m in
                         FileSystems.match([_path(input_dir, "*")])[0].metadata_list)[:10]
        hint = ""
        if any(p.endswith(".csv") for p in present):
            hint = (" The directory holds CSV files: for KuaiSAR use --input-format kuaisar, "
                    "for JDsearch --input-format jdsearch.")
        elif any(p.endswith(".txt") or p.endswith(".tsv") for p in present):
            hint = " For JDsearch files use --input-format jdsearch."
        raise InputError(f"{input_dir} is not a canonical raw-log directory: missing {missing} "
                         f"(found {present}).{hint} The canonical layout is described in "
                         "docs/ARCHITECTURE.md section 1 (python -m preprocessing.synthetic "
                         "writes an example).")
    columns = {}
    for name, required in REQUIRED_COLUMNS.items():
        names = set(_schema(_path(input_dir, name)).names)
        absent = [c for c in required if c not in names]
        if absent:
            raise InputError(f"{_path(input_dir, name)} lacks columns {absent} (has "
                             f"{sorted(names)}); see docs/ARCHITECTURE.md section 1")
        columns[name] = names
    tasks = F.WATCH_TIME_TASKS if LABEL_COLUMNS[F.WATCH_TIME] in columns[REQUESTS] else TASKS
    has_true = all(TRUE_PROB_COLUMNS[t] in columns[REQUESTS] for t in tasks)
    has_vocab = FileSystems.exists(_path(input_dir, QUERY_VOCAB))
    if has_vocab:
        names = set(_schema(_path(input_dir, QUERY_VOCAB)).names)
        absent = [c for c in QUERY_VOCAB_COLUMNS if c not in names]
        if absent:
            raise InputError(f"{_path(input_dir, QUERY_VOCAB)} lacks columns {absent}")
    dim = embedding_dim or _first_embedding_dim(_path(input_dir, ITEMS), "embedding")
    if not dim:
        raise InputError(f"{_path(input_dir, ITEMS)} has no item with an embedding, so the "
                         "embedding dimension is unknown; pass --embedding-dim or fix the file")
    return {"embedding_dim": int(dim), "has_true_probabilities": has_true,
            "has_query_vocab": has_vocab, "tasks": tasks,
            "engagement_names": F.ENGAGEMENT_NAMES[FORMAT],
            # candidate_item_ids is documented as the order shown (metadata.json records it)
            "display_order": True, "display_order_source": F.DISPLAY_ORDER_SOURCES[FORMAT]}


def read_query_vocab(input_dir: str) -> Optional[Dict[str, Any]]:
    """query_vocab.parquet as columns (token_id, word, embedding), or None when absent."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    path = _path(input_dir, QUERY_VOCAB)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        table = pq.read_table(f, columns=list(QUERY_VOCAB_COLUMNS))
    return {c: table.column(c).to_pylist() for c in QUERY_VOCAB_COLUMNS}


# ---- row parsing (pure functions: unit-tested without Beam) ----------------------------------
class RowError(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _text(row: Dict[str, Any], column: str, required: bool = True) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            raise RowError(f"missing_{column}")
        return ""
    value = value.decode() if isinstance(value, bytes) else str(value)
    if required and not value:
        raise RowError(f"missing_{column}")
    return value


def _int(row: Dict[str, Any], column: str) -> int:
    value = row.get(column)
    if value is None:
        raise RowError(f"missing_{column}")
    try:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError
        out = int(value)
    except (TypeError, ValueError):
        raise RowError(f"unparseable_{column}") from None
    return out


def _float(row: Dict[str, Any], column: str) -> float:
    value = row.get(column)
    if value is None:
        raise RowError(f"missing_{column}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RowError(f"unparseable_{column}") from None
    if not math.isfinite(out):
        raise RowError(f"nan_{column}")
    return out


def _embedding(row: Dict[str, Any], column: str, dim: int) -> Tuple[float, ...]:
    value = row.get(column)
    if value is None:
        raise RowError(f"missing_{column}")
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise RowError(f"unparseable_{column}") from None
    if len(out) != dim:
        raise RowError("wrong_embedding_dim")
    if not all(math.isfinite(v) for v in out):
        raise RowError("nan_embedding")
    return out


def parse_item(row: Dict[str, Any], dim: int) -> ItemRecord:
    duration = _float(row, "duration_s")
    if duration < 0:
        raise RowError("negative_duration")
    return ItemRecord(item_id=_text(row, "item_id"), author_id=_text(row, "author_id", False),
                      categories=(_text(row, "category_l1", False),
                                  _text(row, "category_l2", False)),
                      embedding=_embedding(row, "embedding", dim), duration_s=duration)


def parse_user(row: Dict[str, Any]) -> UserRecord:
    return UserRecord(user_id=_text(row, "user_id"),
                      profile=tuple(_text(row, c, False) for c in PROFILE_FIELDS))


def parse_behaviour(row: Dict[str, Any]) -> BehaviourRecord:
    timestamp = _int(row, "timestamp")
    if timestamp < 0:
        raise RowError("negative_timestamp")
    source = _text(row, "source", False)
    if source not in F.SOURCE_NAMES:
        raise RowError("unknown_source")
    watch_ratio, play_time = _float(row, "watch_ratio"), _float(row, "play_time_s")
    if watch_ratio < 0 or play_time < 0:
        raise RowError("negative_duration")
    engagement = (watch_ratio, _float(row, "like"), _float(row, "follow"), _float(row, "share"))
    return BehaviourRecord(user_id=_text(row, "user_id"), item_id=_text(row, "item_id"),
                           timestamp_ms=timestamp, source=F.SOURCE_NAMES[source],
                           engagement=engagement)


def _float_list(row: Dict[str, Any], column: str, n: int) -> List[float]:
    value = row.get(column)
    if value is None:
        raise RowError(f"missing_{column}")
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise RowError(f"unparseable_{column}") from None
    if len(out) != n:
        raise RowError("label_length_mismatch")
    if not all(math.isfinite(v) for v in out):
        raise RowError(f"nan_{column}")
    return out


def parse_request(row: Dict[str, Any], dim: int, has_true_probabilities: bool,
                  tasks: Sequence[str] = TASKS) -> RequestRecord:
    timestamp = _int(row, "timestamp")
    if timestamp < 0:
        raise RowError("negative_timestamp")
    candidates = row.get("candidate_item_ids")
    if candidates is None:
        raise RowError("missing_candidate_item_ids")
    candidates = tuple("" if c is None else str(c) for c in candidates)
    if not candidates:
        raise RowError("no_candidates")
    tokens = row.get("query_tokens") or []
    try:
        tokens = tuple(int(t) for t in tokens)
    except (TypeError, ValueError):
        raise RowError("unparseable_query_tokens") from None
    labels = {task: _float_list(row, LABEL_COLUMNS[task], len(candidates)) for task in tasks}
    if F.WATCH_TIME in labels and any(v < 0 for v in labels[F.WATCH_TIME]):
        raise RowError("negative_play_time_s")
    probs = None
    if has_true_probabilities:
        probs = {task: _float_list(row, TRUE_PROB_COLUMNS[task], len(candidates))
                 for task in tasks}
    return RequestRecord(request_id=_text(row, "request_id"), user_id=_text(row, "user_id"),
                         timestamp_ms=timestamp, query_tokens=tokens,
                         query_embedding=_embedding(row, "query_embedding", dim),
                         candidate_item_ids=candidates, labels=labels, true_probabilities=probs)


def row_text(row: Dict[str, Any]) -> str:
    """A JSON rendering of a raw row for the dead letters (non-JSON values as text)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, bytes):
            return v.decode(errors="replace")
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if hasattr(v, "item"):
            return plain(v.item())
        return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)

    return json.dumps({k: plain(v) for k, v in row.items()}, sort_keys=True)


class ParseRows(beam.DoFn):
    """Parquet row dict -> record (main output) or DeadLetter (DEAD_LETTER output)."""

    def __init__(self, source: str, parser, *parser_args):
        self.source, self.parser, self.parser_args = source, parser, parser_args

    def process(self, row):
        try:
            yield self.parser(row, *self.parser_args)
        except RowError as exc:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, DeadLetter(self.source, exc.reason,
                                                                   row_text(row)))


class ReadCanonical(beam.PTransform):
    """Canonical Parquet directory -> {"items", "users", "behaviours", "requests",
    "dead_letter"} (preprocessing/records.py). `info` is validate()'s result."""

    def __init__(self, input_dir: str, info: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.input_dir = input_dir
        self.info = info or validate(input_dir)

    def expand(self, pbegin):
        dim, has_true = self.info["embedding_dim"], self.info["has_true_probabilities"]
        parsers = {"items": (ITEMS, parse_item, (dim,)), "users": (USERS, parse_user, ()),
                   "behaviours": (BEHAVIOURS, parse_behaviour, ()),
                   "requests": (REQUESTS, parse_request,
                                (dim, has_true, tuple(self.info.get("tasks", TASKS))))}
        out, dead = {}, []
        for key, (name, parser, args) in parsers.items():
            parsed = (pbegin
                      | f"Read_{key}" >> beam.io.ReadFromParquet(_path(self.input_dir, name))
                      | f"Parse_{key}" >> beam.ParDo(ParseRows(name, parser, *args))
                      .with_outputs(DEAD_LETTER, main=key))
            out[key] = parsed[key]
            dead.append(parsed[DEAD_LETTER])
        out["dead_letter"] = tuple(dead) | "FlattenReaderDeadLetters" >> beam.Flatten()
        return out
