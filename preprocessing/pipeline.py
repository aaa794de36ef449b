"""The core preprocessing pipeline (Apache Beam): reader records -> training data + feature store.

    python -m preprocessing --input-format canonical --input RAW --output OUT [--workers 2]

Stages
------
1. Before Beam starts (fail fast): the reader's `validate` / `prepare` checks the input as a
   whole (missing files or columns, another format's files) and, for KuaiSAR / JDsearch, trains
   the text embedding space (`prepare(input_dir, work_dir, options) -> dict`, passed to the
   reader's constructor).
2. Beam: the reader (dispatched by format name, so the choice pickles to remote workers) yields
   the records of preprocessing/records.py. The core then
   * deduplicates items, users, requests (by id) and behaviours (identical rows);
   * builds deterministic vocabularies: sorted raw ids, index k + 1 for the k-th, 0 = unknown;
   * resolves behaviours and candidates against the item vocabulary (unknown items rejected);
   * groups behaviours, requests and the profile by user and joins each request with the
     behaviours strictly before it (preprocessing/point_in_time.py);
   * splits by time and writes GZIP TFRecords, dead letters (JSON lines) and run statistics.
3. After Beam: vocab/*.txt, item_embeddings.npy, metadata.json, stats.json and
   feature_store.sqlite are written from the pipeline's intermediate files (OUT/_work, removed
   at the end), and a summary is printed.

Split by time
-------------
Requests are ordered by timestamp. With n valid requests, T_test is the timestamp of the request
at rank n - ceil(n * test_fraction) and T_eval the one at rank n - ceil(n * (test_fraction +
eval_fraction)): timestamp >= T_test -> test, T_eval <= timestamp < T_test -> eval, the rest ->
train. Requests with equal timestamps always share a split, so the held-out part can be slightly
larger than asked. JDsearch has no absolute clock (each user's times are offsets from a common
base), so its split holds out the requests that come latest in each user's own timeline.

Running on Dataflow
-------------------
Workers need this repository's `common` and `preprocessing` packages and the pinned stack of
requirements.txt (numpy, pyarrow, tensorflow for make_example, apache-beam[gcp]); ship them with
`--setup_file ./setup.py` (a setuptools file listing the two packages) or a custom container,
plus `--requirements_file requirements.txt`. The feature store and the small metadata files are
written by the launching process after the job; for gs:// outputs the SQLite file is built in a
local temporary directory and then copied.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

import common  # noqa: F401
from common import features as F
from common import point_in_time as pit
from preprocessing import stats as S
from preprocessing.records import DeadLetter
from preprocessing.splits import request_timestamps_to_cutoffs, split_of

log = logging.getLogger(__name__)

READERS = {  # format -> (module, reader class); imported lazily by name (picklable choice)
    "canonical": ("preprocessing.canonical", "ReadCanonical"),
    "kuaisar": ("preprocessing.kuaisar", "ReadKuaiSAR"),
    "jdsearch": ("preprocessing.jdsearch", "ReadJDsearch"),
}
WORK_DIR = "_work"
DEAD_LETTER_DIR = "dead_letter"
STATS_FILE = "stats.json"
FEATURE_STORE_FILE = "feature_store.sqlite"
DEAD = "dead_letter"
STATS = "stats"


class InputError(ValueError):
    """The input as a whole is unusable (raised before Beam starts)."""


# ---- configuration shipped to workers (plain, picklable values only) --------------------------
@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the workers need. `metadata` holds every setting that shapes the examples (tasks,
    dimensions, sequence lengths, long-term mode, stage-1 K and threshold, hashing buckets);
    `finish` completes it with the vocabulary sizes and writes it as metadata.json, so the
    trainer and serving read exactly the settings the data was built with."""

    metadata: F.DatasetMetadata
    eval_fraction: float
    test_fraction: float
    # token id -> embedding, to embed a request that arrives without a query embedding
    query_vocab: Optional[Dict[int, Tuple[float, ...]]] = None
    num_shards: int = 0


def core_config(args: argparse.Namespace, prepared: Dict[str, Any]) -> PipelineConfig:
    stage1 = args.long_term_mode == "stage1"
    vocab = prepared.get("query_vocab")
    metadata = F.DatasetMetadata(
        input_format=args.input_format, tasks=tuple(prepared["tasks"]),
        embedding_dim=int(prepared["embedding_dim"]),
        query_token_buckets=int(args.query_token_buckets),
        profile_buckets=int(args.profile_buckets),
        long_term_length=int(args.stage1_k if stage1 else args.long_term_length),
        real_time_length=int(args.real_time_length), max_candidates=int(args.max_candidates),
        long_term_mode=args.long_term_mode, stage1_k=int(args.stage1_k) if stage1 else None,
        stage1_threshold=args.stage1_threshold if stage1 else None,
        engagement_names=tuple(prepared["engagement_names"]),
        has_true_probabilities=bool(prepared.get("has_true_probabilities", False)),
        display_order=bool(prepared.get("display_order", False)),
        display_order_source=str(prepared.get("display_order_source", "")
                                 or "the reader does not record the display order"))
    return PipelineConfig(
        metadata=metadata, eval_fraction=float(args.eval_fraction),
        test_fraction=float(args.test_fraction),
        query_vocab=None if vocab is None else {
            int(t): tuple(float(x) for x in e)
            for t, e in zip(vocab["token_id"], vocab["embedding"])},
        num_shards=int(getattr(args, "num_shards", 0) or 0))


def _dead(source: str, reason: str, row: Any) -> beam.pvalue.TaggedOutput:
    text = row if isinstance(row, str) else json.dumps(_plain(row), sort_keys=True)
    return beam.pvalue.TaggedOutput(DEAD, DeadLetter(source, reason, text))


def _plain(value):
    if hasattr(value, "_asdict"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return value


def _stat(name: str, n: int = 1):
    return beam.pvalue.TaggedOutput(STATS, S.count(name, n))


# ---- items, users, vocabularies --------------------------------------------------------------
class ValidateItems(beam.DoFn):
    """(item_id, [ItemRecord]) -> one item (the first of equal ids, deterministic) or rejects."""

    def __init__(self, dim: int):
        self.dim = dim

    def process(self, element):
        item_id, records = element
        records = sorted(records, key=repr)
        for extra in records[1:]:
            yield _dead("items", "duplicate_item", extra)
            yield _stat("items_rejected/duplicate_item")
        item = records[0]
        if not item_id:
            yield _dead("items", "missing_item_id", item)
            yield _stat("items_rejected/missing_item_id")
            return
        embedding = item.embedding
        if embedding is None:
            yield _stat("items_without_embedding")
            embedding = (0.0,) * self.dim
        elif len(embedding) != self.dim:
            yield _dead("items", "wrong_embedding_dim", item)
            yield _stat("items_rejected/wrong_embedding_dim")
            return
        elif not all(math.isfinite(float(v)) for v in embedding):
            yield _dead("items", "nan_embedding", item)
            yield _stat("items_rejected/nan_embedding")
            return
        categories = tuple(item.categories)[:F.NUM_CATEGORY_LEVELS]
        yield item._replace(embedding=tuple(float(v) for v in embedding),
                            categories=categories
                            + ("",) * (F.NUM_CATEGORY_LEVELS - len(categories)))


def build_catalog(items: List[Any]) -> Dict[str, Any]:
    """Item, author and category vocabularies (sorted raw ids, index 0 = unknown) and the rows
    of every item: id -> (item_index, author_index, category indices); embeddings [M + 1, D]."""
    items = sorted(items, key=lambda r: r.item_id)
    authors = sorted({r.author_id for r in items if r.author_id})
    categories = sorted({c for r in items for c in r.categories if c})
    author_index = {a: k + 1 for k, a in enumerate(authors)}
    category_index = {c: k + 1 for k, c in enumerate(categories)}
    rows, embeddings = {}, [None] * len(items)
    durations = np.zeros(len(items) + 1, np.float32)  # 0 = unknown
    for k, r in enumerate(items):
        rows[r.item_id] = (k + 1, author_index.get(r.author_id, F.OOV_INDEX),
                           tuple(category_index.get(c, F.OOV_INDEX) for c in r.categories))
        embeddings[k] = r.embedding
        duration = getattr(r, "duration_s", None)
        if duration is not None and math.isfinite(duration) and duration > 0:
            durations[k + 1] = duration
    dim = len(items[0].embedding) if items else 0
    table = np.zeros((len(items) + 1, dim), np.float32)
    if items:
        table[1:] = np.asarray(embeddings, np.float32)
    return {"items": [r.item_id for r in items], "authors": authors, "categories": categories,
            "rows": rows, "embeddings": table, "durations": durations}


class ValidateUsers(beam.DoFn):
    def process(self, element):
        user_id, records = element
        records = sorted(records, key=repr)
        for extra in records[1:]:
            yield _dead("users", "duplicate_user", extra)
            yield _stat("users_rejected/duplicate_user")
        if not user_id:
            yield _dead("users", "missing_user_id", records[0])
            yield _stat("users_rejected/missing_user_id")
            return
        yield records[0]


# ---- behaviours and requests ---------------------------------------------------------------
class ResolveBehaviours(beam.DoFn):
    """BehaviourRecord -> (user_id, pit.BehaviourRow) with vocabulary indices, or a reject."""

    def process(self, b, catalog):
        yield _stat("behaviours_read")
        reason = None
        if not b.user_id:
            reason = "missing_user_id"
        elif b.item_id not in catalog["rows"]:
            reason = "unknown_item"
        elif not isinstance(b.timestamp_ms, (int, np.integer)) or b.timestamp_ms < 0:
            reason = "negative_timestamp" if isinstance(b.timestamp_ms, (int, np.integer)) \
                else "unparseable_timestamp"
        elif b.source not in (F.SOURCE_UNKNOWN, F.SOURCE_FEED, F.SOURCE_SEARCH):
            reason = "unknown_source"
        elif len(b.engagement) != F.ENGAGEMENT_DIM:
            reason = "wrong_engagement_dim"
        elif not all(math.isfinite(float(v)) for v in b.engagement):
            reason = "nan_engagement"
        if reason:
            yield _dead("behaviours", reason, b)
            yield _stat(f"behaviours_rejected/{reason}")
            return
        index, author, categories = catalog["rows"][b.item_id]
        yield (b.user_id, pit.BehaviourRow(
            timestamp_ms=int(b.timestamp_ms), item=int(index), source=int(b.source),
            engagement=tuple(float(v) for v in b.engagement), author=int(author),
            category=tuple(categories)))


def _query_embedding(request, config) -> Optional[Tuple[float, ...]]:
    if request.query_embedding is not None:
        return tuple(request.query_embedding)
    vocab = config.query_vocab
    if not vocab:
        return None
    known = [vocab[t] for t in request.query_tokens if t in vocab]
    if not known:
        return None
    from common.feature_store import normalised_mean

    return tuple(normalised_mean(np.asarray(known, np.float32)).tolist())


def _valid_positions(positions, n: int) -> bool:
    """None (the list order is the display order) or n distinct non-negative positions."""
    if positions is None:
        return True
    try:
        values = [int(p) for p in positions]
    except (TypeError, ValueError):
        return False
    return len(values) == n and min(values, default=0) >= 0 and len(set(values)) == n


class ResolveRequests(beam.DoFn):
    """(request_id, [RequestRecord]) -> (user_id, resolved request dict) or rejects.

    Unknown candidates are removed one by one (each a dead letter); candidates beyond
    max_candidates are truncated (counted); a request whose own fields are unusable is
    rejected whole. When the data keeps the display order, every kept candidate carries the
    position it was shown at (removed candidates leave gaps: positions are never renumbered)."""

    def __init__(self, config):
        self.config = config

    def process(self, element, catalog):
        request_id, records = element
        records = sorted(records, key=repr)
        yield _stat("requests_read", len(records))
        for extra in records[1:]:
            yield _dead("requests", "duplicate_request", extra)
            yield _stat("requests_rejected/duplicate_request")
        r = records[0]
        cfg = self.config
        reason = None
        embedding = _query_embedding(r, cfg)
        n = len(r.candidate_item_ids)
        if not request_id:
            reason = "missing_request_id"
        elif not r.user_id:
            reason = "missing_user_id"
        elif not isinstance(r.timestamp_ms, (int, np.integer)) or r.timestamp_ms < 0:
            reason = "negative_timestamp"
        elif embedding is None:
            reason = "missing_query_embedding"
        elif len(embedding) != cfg.metadata.embedding_dim:
            reason = "wrong_embedding_dim"
        elif not all(math.isfinite(v) for v in embedding):
            reason = "nan_embedding"
        elif n == 0:
            reason = "no_candidates"
        elif any(t not in r.labels for t in cfg.metadata.tasks):
            reason = "missing_labels"
        elif any(len(r.labels[t]) != n for t in cfg.metadata.tasks):
            reason = "label_length_mismatch"
        elif cfg.metadata.has_true_probabilities and (
                not r.true_probabilities
                or any(len(r.true_probabilities.get(t, ())) != n for t in cfg.metadata.tasks)):
            reason = "label_length_mismatch"
        elif cfg.metadata.display_order and not _valid_positions(r.candidate_positions, n):
            reason = "bad_candidate_positions"
        if reason:
            yield _dead("requests", reason, r)
            yield _stat(f"requests_rejected/{reason}")
            return
        keep = []
        for pos, item_id in enumerate(r.candidate_item_ids):
            if item_id in catalog["rows"]:
                keep.append(pos)
            else:
                yield _dead("requests", "unknown_candidate_item", {
                    "request_id": request_id, "position": pos, "candidate_item_id": item_id})
                yield _stat("candidates_rejected/unknown_item")
        if len(keep) > cfg.metadata.max_candidates:
            yield _stat("candidates_truncated", len(keep) - cfg.metadata.max_candidates)
            keep = keep[:cfg.metadata.max_candidates]
        if not keep:
            yield _dead("requests", "no_known_candidates", r)
            yield _stat("requests_rejected/no_known_candidates")
            return
        rows = [catalog["rows"][r.candidate_item_ids[p]] for p in keep]
        resolved = {
            F.REQUEST_ID: request_id, F.USER_ID: r.user_id, F.REQUEST_TIME: int(r.timestamp_ms),
            F.QUERY_TOKENS: [F.query_token_index(t, cfg.metadata.query_token_buckets)
                             for t in r.query_tokens][:F.MAX_QUERY_TOKENS],
            F.QUERY_EMBEDDING: list(embedding),
            F.CANDIDATE_ITEM: [row[0] for row in rows],
            F.CANDIDATE_AUTHOR: [row[1] for row in rows],
            F.CANDIDATE_CATEGORY: [list(row[2]) for row in rows],
        }
        if cfg.metadata.display_order:  # where each kept candidate was shown (gaps remain)
            shown = r.candidate_positions if r.candidate_positions is not None else range(n)
            resolved[F.CANDIDATE_POSITION] = [int(shown[p]) for p in keep]
        for task in cfg.metadata.tasks:
            resolved[F.label_feature(task)] = [float(r.labels[task][p]) for p in keep]
            if cfg.metadata.has_true_probabilities:
                resolved[F.true_prob_feature(task)] = [
                    float(r.true_probabilities[task][p]) for p in keep]
        yield (r.user_id, resolved)


# ---- the point-in-time join per user --------------------------------------------------------
class JoinUser(beam.DoFn):
    """(user_id, {behaviours, requests, users}) -> (split, serialized Example) per request; the
    user's feature-store row (HISTORY output); stats and dead letters."""

    HISTORY = "history"

    def __init__(self, config):
        self.config = config

    def process(self, element, catalog, user_vocab, cutoffs):
        user_id, groups = element
        cfg = self.config
        unique, duplicates = pit.sort_behaviours(groups["behaviours"])
        for row in duplicates:
            yield _dead("behaviours", "duplicate_behaviour", {"user_id": user_id, "row": row})
            yield _stat("behaviours_rejected/duplicate_behaviour")
        yield _stat("behaviours", len(unique))
        history = pit.to_history(unique)
        users = list(groups["users"])
        profile = [F.OOV_INDEX] * F.USER_PROFILE_DIM
        if users:
            raw = list(users[0].profile)[:F.USER_PROFILE_DIM]
            profile = [F.profile_value_index(f"profile{k}", v, cfg.metadata.profile_buckets)
                       for k, v in enumerate(raw)]
            profile += [F.OOV_INDEX] * (F.USER_PROFILE_DIM - len(profile))
        user_index = user_vocab.get(user_id, F.OOV_INDEX)
        yield beam.pvalue.TaggedOutput(self.HISTORY, json.dumps(
            [user_id, user_index, profile, [r.to_json() for r in unique]]))
        table = catalog["embeddings"]
        for request in sorted(groups["requests"], key=lambda r: r[F.REQUEST_ID]):
            t = request[F.REQUEST_TIME]
            features = pit.join_request(history, t, cfg.metadata, request[F.QUERY_EMBEDDING],
                                        table)
            example = dict(request)
            example.update(features)
            example[F.USER_INDEX] = user_index
            example[F.USER_PROFILE] = profile
            split = split_of(t, cutoffs)
            long_n = len(features[F.seq_feature(F.LONG_TERM, F.SEQ_ITEM)])
            rt_n = len(features[F.seq_feature(F.REAL_TIME, F.SEQ_ITEM)])
            yield beam.pvalue.TaggedOutput(STATS, S.hist("long", long_n))
            yield beam.pvalue.TaggedOutput(STATS, S.hist("rt", rt_n))
            yield beam.pvalue.TaggedOutput(
                STATS, S.hist("candidates", len(request[F.CANDIDATE_ITEM])))
            if rt_n == 0:
                yield _stat("requests_with_empty_history")
            yield _stat("examples")
            yield _stat(f"split/{split}")
            yield _stat("candidates", len(request[F.CANDIDATE_ITEM]))
            yield (split, F.make_example(example, cfg.metadata.tasks).SerializeToString(
                deterministic=True))  # sorted feature map: identical bytes on every worker


# ---- the pipeline ----------------------------------------------------------------------------
def reader_for(input_format: str, input_dir: str, prepared: Dict[str, Any]) -> beam.PTransform:
    """The reader PTransform of a format (imported by module name)."""
    if input_format not in READERS:
        raise InputError(f"unknown input format {input_format!r}; expected one of "
                         f"{sorted(READERS)}")
    module_name, class_name = READERS[input_format]
    reader_cls = getattr(importlib.import_module(module_name), class_name)
    if input_format == "canonical":
        return reader_cls(input_dir, prepared)
    return reader_cls(input_dir, **prepared.get("reader_kwargs", {}))


def expand_core(records: Dict[str, beam.PCollection], config: Dict[str, Any], output: str
                ) -> Dict[str, beam.PCollection]:
    """Applies the core to a reader's records; writes everything under `output`."""
    work = os.path.join(output, WORK_DIR)

    items = (records["items"]
             | "KeyItems" >> beam.Map(lambda r: (r.item_id, r))
             | "GroupItems" >> beam.GroupByKey()
             | "ValidateItems" >> beam.ParDo(ValidateItems(config.metadata.embedding_dim))
             .with_outputs(DEAD, STATS, main="items"))
    catalog = (items.items
               | "AllItems" >> beam.combiners.ToList()
               | "BuildCatalog" >> beam.Map(build_catalog))
    catalog_side = beam.pvalue.AsSingleton(catalog)

    users = (records["users"]
             | "KeyUsers" >> beam.Map(lambda r: (r.user_id, r))
             | "GroupUsers" >> beam.GroupByKey()
             | "ValidateUsers" >> beam.ParDo(ValidateUsers()).with_outputs(DEAD, STATS,
                                                                           main="users"))
    behaviours = (records["behaviours"]
                  | "ResolveBehaviours" >> beam.ParDo(ResolveBehaviours(), catalog_side)
                  .with_outputs(DEAD, STATS, main="behaviours"))
    requests = (records["requests"]
                | "KeyRequests" >> beam.Map(lambda r: (r.request_id, r))
                | "GroupRequests" >> beam.GroupByKey()
                | "ResolveRequests" >> beam.ParDo(ResolveRequests(config), catalog_side)
                .with_outputs(DEAD, STATS, main="requests"))

    user_ids = ((users.users | "UserIds" >> beam.Map(lambda r: r.user_id),
                 behaviours.behaviours | "BehaviourUserIds" >> beam.Keys(),
                 requests.requests | "RequestUserIds" >> beam.Keys())
                | "FlattenUserIds" >> beam.Flatten()
                | "DistinctUserIds" >> beam.Distinct()
                | "AllUserIds" >> beam.combiners.ToList()
                | "UserVocab" >> beam.Map(sorted))
    cutoffs = (requests.requests
               | "RequestTimes" >> beam.Map(lambda kv: kv[1][F.REQUEST_TIME])
               | "AllRequestTimes" >> beam.combiners.ToList()
               | "Cutoffs" >> beam.Map(request_timestamps_to_cutoffs, config.eval_fraction,
                                       config.test_fraction))
    joined = ({"behaviours": behaviours.behaviours, "requests": requests.requests,
               "users": users.users | "KeyProfiles" >> beam.Map(lambda r: (r.user_id, r))}
              | "GroupByUser" >> beam.CoGroupByKey()
              | "JoinPointInTime" >> beam.ParDo(
                  JoinUser(config), catalog_side,
                  beam.pvalue.AsSingleton(user_ids | "UserIndex" >> beam.Map(
                      lambda ids: {u: k + 1 for k, u in enumerate(ids)})),
                  beam.pvalue.AsSingleton(cutoffs))
              .with_outputs(JoinUser.HISTORY, DEAD, STATS, main="examples"))

    shards = config.num_shards
    for split in F.SPLITS:
        (joined.examples
         | f"Only_{split}" >> beam.Filter(lambda kv, s=split: kv[0] == s)
         | f"Values_{split}" >> beam.Values()
         | f"Write_{split}" >> beam.io.WriteToTFRecord(
             os.path.join(output, split, "part"), file_name_suffix=".tfrecord.gz",
             num_shards=shards, compression_type=beam.io.filesystem.CompressionTypes.GZIP))

    dead = ((records["dead_letter"], items[DEAD], users[DEAD], behaviours[DEAD], requests[DEAD],
             joined[DEAD]) | "FlattenDeadLetters" >> beam.Flatten())
    (dead | "DeadLetterJson" >> beam.Map(lambda d: json.dumps(
        {"source": d.source, "reason": d.reason, "row": d.row}, sort_keys=True))
     | "WriteDeadLetters" >> beam.io.WriteToText(
         os.path.join(output, DEAD_LETTER_DIR, "part"), file_name_suffix=".jsonl"))
    stats = ((items[STATS], users[STATS], behaviours[STATS], requests[STATS], joined[STATS],
              dead | "DeadLetterStats" >> beam.Map(
                  lambda d: S.count(f"dead_letter/{d.source}:{d.reason}")))
             | "FlattenStats" >> beam.Flatten()
             | "CombineStats" >> beam.CombineGlobally(S.StatsCombineFn()))
    (stats | "StatsJson" >> beam.Map(json.dumps)
     | "WriteStats" >> beam.io.WriteToText(os.path.join(work, "stats"), num_shards=1,
                                           file_name_suffix=".json"))
    (cutoffs | "CutoffsJson" >> beam.Map(lambda c: json.dumps({"eval": c[0], "test": c[1]}))
     | "WriteCutoffs" >> beam.io.WriteToText(os.path.join(work, "cutoffs"), num_shards=1,
                                             file_name_suffix=".json"))
    (catalog | "CatalogRows" >> beam.FlatMap(_catalog_lines)
     | "WriteCatalog" >> beam.io.WriteToText(os.path.join(work, "catalog"),
                                             file_name_suffix=".jsonl"))
    (user_ids | "UserVocabJson" >> beam.Map(json.dumps)
     | "WriteUserVocab" >> beam.io.WriteToText(os.path.join(work, "users"), num_shards=1,
                                               file_name_suffix=".json"))
    (joined[JoinUser.HISTORY]
     | "WriteHistories" >> beam.io.WriteToText(os.path.join(work, "histories"),
                                               file_name_suffix=".jsonl"))
    return {"examples": joined.examples, "dead_letter": dead, "stats": stats,
            "catalog": catalog, "cutoffs": cutoffs}


def _catalog_lines(catalog: Dict[str, Any]) -> Iterable[str]:
    yield json.dumps({"vocab": {"items": catalog["items"], "authors": catalog["authors"],
                                "categories": catalog["categories"]}})
    for item_id, (index, author, categories) in catalog["rows"].items():
        yield json.dumps({"item": [index, item_id, author, list(categories),
                                   catalog["embeddings"][index].tolist()],
                          "duration_s": float(catalog["durations"][index])})


# ---- driver ----------------------------------------------------------------------------------
def prepare_input(args: argparse.Namespace, work_dir: str) -> Dict[str, Any]:
    """Fail-fast validation and the reader's preparation, before Beam starts."""
    if args.input_format == "canonical":
        from preprocessing import canonical

        try:
            info = canonical.validate(args.input, args.embedding_dim)
        except canonical.InputError as exc:
            raise InputError(str(exc)) from exc
        info["query_vocab"] = canonical.read_query_vocab(args.input)
        return info
    module_name, _ = READERS[args.input_format]
    module = importlib.import_module(module_name)
    if not FileSystems.exists(args.input):
        raise InputError(f"input directory {args.input} does not exist")
    try:
        prepared = module.prepare(args.input, work_dir, args) if hasattr(module, "prepare") \
            else {}
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"{args.input} is not usable as --input-format {args.input_format}: "
                         f"{exc}") from exc
    vocab = prepared.get("query_vocab")
    dim = args.embedding_dim
    if dim is None and vocab is not None and len(vocab["embedding"]):
        dim = int(np.asarray(vocab["embedding"]).shape[1])
    if dim is None and prepared.get("text_encoder") is not None:
        dim = int(prepared["text_encoder"].table.shape[1])
    if dim is None:
        raise InputError("the embedding dimension is unknown: pass --embedding-dim")
    return {"embedding_dim": dim, "query_vocab": vocab,
            "tasks": prepared.get("tasks", F.TASKS_BY_FORMAT[args.input_format]),
            "engagement_names": prepared.get("engagement_names",
                                             F.ENGAGEMENT_NAMES[args.input_format]),
            "has_true_probabilities": False, "reader_kwargs": prepared,
            "display_order": bool(prepared.get("display_order", False)),
            "display_order_source": prepared.get("display_order_source", "")}


def _read_lines(pattern: str) -> Iterable[str]:
    for match in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(match.path) as f:
            for line in io.TextIOWrapper(f, encoding="utf-8"):
                if line.strip():
                    yield line


def _write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


def finish(output: str, config: PipelineConfig, prepared: Dict[str, Any],
           write_feature_store: bool = True, progress=print) -> Dict[str, Any]:
    """Writes vocab/, item_embeddings.npy, metadata.json, stats.json and the feature store from
    the pipeline's intermediate files; returns the stats."""
    work = os.path.join(output, WORK_DIR)
    vocab, item_rows, durations = None, [], {}
    for line in _read_lines(os.path.join(work, "catalog*")):
        record = json.loads(line)
        if "vocab" in record:
            vocab = record["vocab"]
        else:
            item_rows.append(record["item"])
            durations[record["item"][0]] = record.get("duration_s", 0.0)
    if vocab is None:
        raise RuntimeError(f"the pipeline wrote no catalog under {work}")
    users = json.loads(next(iter(_read_lines(os.path.join(work, "users*")))))
    vocab["users"] = users
    for name, ids in vocab.items():
        _write_bytes(os.path.join(output, F.VOCAB_DIR, f"{name}.txt"),
                     "".join(f"{i}\n" for i in ids).encode())
    dim = config.metadata.embedding_dim
    table = np.zeros((len(vocab["items"]) + 1, dim), np.float32)
    for index, _, _, _, embedding in item_rows:
        table[index] = embedding
    buffer = io.BytesIO()
    np.save(buffer, table)
    _write_bytes(os.path.join(output, F.ITEM_EMBEDDINGS_FILE), buffer.getvalue())
    duration_table = np.zeros(len(vocab["items"]) + 1, np.float32)
    for index, seconds in durations.items():
        duration_table[index] = seconds
    items_with_duration = int(np.count_nonzero(duration_table))
    if items_with_duration:
        buffer = io.BytesIO()
        np.save(buffer, duration_table)
        _write_bytes(os.path.join(output, F.ITEM_DURATIONS_FILE), buffer.getvalue())
    metadata = dataclasses.replace(
        config.metadata, num_items=len(vocab["items"]), num_authors=len(vocab["authors"]),
        num_categories=len(vocab["categories"]), num_users=len(users),
        item_durations=items_with_duration > 0)
    metadata.save(output)

    raw_stats = json.loads(next(iter(_read_lines(os.path.join(work, "stats*")))))
    cutoffs = json.loads(next(iter(_read_lines(os.path.join(work, "cutoffs*")))))
    stats = S.summarise(raw_stats)
    stats.update({"items": metadata.num_items, "users": metadata.num_users,
                  "authors": metadata.num_authors, "categories": metadata.num_categories,
                  "long_term_mode": metadata.long_term_mode,
                  "display_order": metadata.display_order,
                  "display_order_source": metadata.display_order_source,
                  "items_with_duration": items_with_duration,
                  "split_rule": "by request timestamp: latest test_fraction -> test, the "
                                "preceding eval_fraction -> eval (ties share a split)",
                  "eval_fraction": config.eval_fraction,
                  "test_fraction": config.test_fraction,
                  # first request time of eval / test (max int64: no such split): what later
                  # steps (the item-to-item table, retrieval evaluation) must not learn from
                  "split_cutoffs_ms": cutoffs})
    text_tower = prepared.get("reader_kwargs", {}).get("text_tower_stats")
    if text_tower:
        stats["text_tower"] = text_tower
        trained_before = text_tower.get("split_cutoffs_ms")
        if trained_before is not None and trained_before != cutoffs:
            # the reader's prepare() must see the same requests as the pipeline, or the text
            # space may have learned from eval/test sessions
            raise RuntimeError(
                f"the text tower was trained with split cutoffs {trained_before} but the "
                f"pipeline split at {cutoffs}: the reader's prepare() and the pipeline "
                f"disagree on the requests; the eval/test metrics would be leaked")
    if write_feature_store:
        stats["feature_store"] = _write_feature_store(output, metadata, item_rows, prepared,
                                                      progress)
    _write_bytes(os.path.join(output, STATS_FILE),
                 json.dumps(stats, indent=2, sort_keys=True, default=float).encode())
    check_accounting(stats)  # after stats.json is written, so the gap can be inspected
    for match in FileSystems.match([os.path.join(work, "*")])[0].metadata_list:
        FileSystems.delete([match.path])
    if not output.startswith("gs://") and os.path.isdir(work):
        shutil.rmtree(work, ignore_errors=True)
    return stats


def check_accounting(stats: Dict[str, Any]) -> None:
    """Every request and behaviour read is written or rejected with a counted reason.

    A runner that loses work (a crashed worker of the multi-process runner, seen once on a
    machine short of memory) would otherwise leave a smaller dataset that looks complete.
    Raises RuntimeError naming the gap; stats.json is already written for inspection."""
    problems = []
    for read, kept, rejected in (("requests_read", "examples", "requests_rejected"),
                                 ("behaviours_read", "behaviours", "behaviours_rejected")):
        n_read, n_kept = int(stats.get(read, 0)), int(stats.get(kept, 0))
        n_rejected = int(sum(stats.get(rejected, {}).values()))
        if n_read != n_kept + n_rejected:
            problems.append(f"{read} {n_read} != {kept} {n_kept} + {rejected} {n_rejected}")
    if problems:
        raise RuntimeError(
            "the pipeline lost records without rejecting them (" + "; ".join(problems) + "): "
            "the runner dropped work and the output is incomplete; run again (with --workers 1 "
            "to rule out the multi-process runner)")


def _write_feature_store(output: str, metadata: F.DatasetMetadata, item_rows, prepared,
                         progress) -> Dict[str, int]:
    from common.feature_store import SqliteFeatureStore

    local_dir = output if FileSystems.get_scheme(output) in (None, "file") else tempfile.mkdtemp()
    path = os.path.join(local_dir, FEATURE_STORE_FILE)
    store = SqliteFeatureStore.create(path, metadata)
    store.write_items(sorted(item_rows))
    work = os.path.join(output, WORK_DIR)
    n_users = 0
    for line in _read_lines(os.path.join(work, "histories*")):
        user_id, user_index, profile, rows = json.loads(line)
        store.write_users([(user_id, user_index, profile)])
        store.write_behaviours(
            (user_id, r.timestamp_ms, r.item, r.author, r.category, r.engagement, r.source)
            for r in map(pit.BehaviourRow.from_json, rows))
        n_users += 1
        if n_users % 10000 == 0:
            progress(f"  feature store: {n_users} users written")
    vocab = prepared.get("query_vocab")
    if vocab is not None:
        store.write_query_vocab(zip(vocab["token_id"], vocab["word"], vocab["embedding"]))
    counts = store.counts()
    store.close()
    if local_dir != output:
        with open(path, "rb") as f:
            _write_bytes(os.path.join(output, FEATURE_STORE_FILE), f.read())
        shutil.rmtree(local_dir, ignore_errors=True)
    return counts


def run(argv: Optional[Sequence[str]] = None, progress=print) -> Dict[str, Any]:
    """Parses the command line, runs the pipeline and the finishing steps; returns the stats."""
    from preprocessing import options as O

    args, beam_args = O.parse_args(argv)
    started = time.time()
    progress(f"[1/3] checking {args.input} as --input-format {args.input_format}")
    try:
        # the readers' prepare() keeps what it trains (text_encoder.npz, text_tower_stats.json)
        # next to the data it describes
        prepared = prepare_input(args, args.output)
        config = core_config(args, prepared)
        for split in F.SPLITS:  # a rerun must not mix old shards with new ones
            old = FileSystems.match([os.path.join(args.output, split, "part-*")])[0]
            if old.metadata_list:
                FileSystems.delete([m.path for m in old.metadata_list])
        old = FileSystems.match([os.path.join(args.output, DEAD_LETTER_DIR, "part-*")])[0]
        if old.metadata_list:
            FileSystems.delete([m.path for m in old.metadata_list])
        options, runner = O.pipeline_options(beam_args, args.workers)
        where = f"in-process, {args.workers} worker(s)" if runner else "runner from options"
        progress(f"[2/3] running the Beam pipeline ({where})")
        with beam.Pipeline(runner=runner, options=options) as p:
            records = p | "Read" >> reader_for(args.input_format, args.input, prepared)
            expand_core(records, config, args.output)
        progress(f"[3/3] writing vocabularies, metadata, stats and the feature store "
                 f"({time.time() - started:.1f}s so far)")
        stats = finish(args.output, config, prepared, write_feature_store=not args.no_feature_store,
                       progress=progress)
    except KeyboardInterrupt:
        progress("interrupted: the output directory is incomplete; rerun the command")
        raise
    stats["seconds"] = round(time.time() - started, 2)
    progress(S.format_summary(stats))
    progress(f"done in {stats['seconds']:.1f}s -> {args.output}")
    return stats
