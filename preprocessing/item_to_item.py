"""Item-to-item table for QRCF retrieval (PR2, Kuaishou, arXiv 2409.11281), as a Beam pipeline.

    python -m preprocessing.item_to_item --data OUT [--window-hours 24] [--neighbours 50] \\
        [--before-ms T] [--workers 2] [--output DIR]

PR2's QRCF keeps the user's behaviours that are relevant to the query and fetches videos
similar to them "by item-to-item similarity". The paper does not say which similarity; this
module computes collaborative ItemCF-IUF weights from the full-site behaviours (feed and search)
in the feature store the preprocessing run wrote (OUT/feature_store.sqlite, every input format's
behaviours as item indices).

What it computes
----------------
Only behaviours with timestamp < before_ms take part (strictly before: the default cutoff is the
start of the eval split, so nothing the evaluation asks about shapes the table), and only known
items (index > 0). For each user u:

* N(u) = the distinct items of u's behaviours before the cutoff;
* P(u) = the unordered pairs {i, j}, i != j, such that u has a behaviour of i and one of j at
  most `window_hours` apart (inclusive). Behaviours are taken oldest first; each behaviour is
  paired with at most the next `max_window_behaviours` behaviours (bounds the cost for heavy
  users, whose windows would otherwise produce quadratically many pairs). A pair counts once
  per user however often it co-occurs.

With U(i) the number of users having i in N(u):

    C(i, j)   = sum over users u with {i, j} in P(u) of  1 / ln(1 + |N(u)|)
    sim(i, j) = C(i, j) / sqrt(|U(i)| * |U(j)|)

and each item keeps its `neighbours` highest-weighted partners (equal weights: lower index
first). The table is symmetric before that cut.

Why ItemCF-IUF rather than Swing: both damp popularity. IUF (Breese et al. 1998's inverse user
frequency, as in ItemCF-IUF) lowers the vote of users with many items (a heavy user's pairs say
little each), and the sqrt(|U(i)| |U(j)|) normaliser stops popular items from being everyone's
neighbour. Swing (Yang et al. 2020) instead sums, over *pairs of users* who both have i and j,
1 / (alpha + |N(u) ∩ N(v)|): its cost grows with the square of each pair's co-engagers and it
needs a self-join of users per item pair, and on sparse logs most pairs have one co-engager,
which Swing scores zero. ItemCF-IUF is one CombinePerKey sum of per-user contributions, linear
in the windowed co-occurrences, and keeps single-user evidence (down-weighted).

Beam plan (transforms from the Beam library wherever one fits)
---------------------------------------------------------------
users (ReadFromText OUT/vocab/users.txt) -> Reshuffle -> ReadHistories (feature store, one
query per user) -> [distinct items -> CombinePerKey(sum) = U(i)] and [window pairs ->
CombinePerKey(sum) = C(i, j)] -> normalise with U as a side input (AsDict) -> both directions ->
combiners.Top.PerKey(neighbours) -> JSON lines. The feature store is a local SQLite file, so
this runs on the in-process runner (`--workers N` uses N processes); on a distributed runner the
workers would need their own copy of the file.

Output: OUT/item_to_item/, or --output DIR (e.g. a pipeline step's own output artifact, which
must not write into its input); common/item_to_item.py gives the layout and
`read_item_to_item`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import logging
import math
import os
import sys
import time
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

import common  # noqa: F401
from common import features as F
from common import item_to_item as table_format
from common.feature_store import FEATURE_STORE_FILE, SqliteFeatureStore

log = logging.getLogger(__name__)

ALGORITHM = "itemcf-iuf"
METRICS_NAMESPACE = "preprocessing.item_to_item"
DEFAULT_WINDOW_HOURS = 24.0
DEFAULT_NEIGHBOURS = 50
DEFAULT_MAX_WINDOW_BEHAVIOURS = 100
HOUR_MS = 3_600_000
# The whole history, not a window: every pair of a user's items co-occurs.
NO_WINDOW = math.inf
# Where a preprocessing run may have recorded its split cutoffs (first found wins). The eval
# cutoff is the first held-out request time (T_eval of preprocessing/splits.py).
RECORDED_CUTOFF_KEYS = (
    ("stats.json", ("split_cutoffs_ms", "eval")),
    ("metadata.json", ("split_cutoffs_ms", "eval")),
    ("stats.json", ("text_tower", "split_cutoffs_ms", "eval")),
)
NEVER_MS = int(np.iinfo(np.int64).max)


@dataclasses.dataclass(frozen=True)
class ItemToItemSettings:
    """How the table is built (see the module docstring for the formula)."""

    window_hours: float = DEFAULT_WINDOW_HOURS  # math.inf: the whole history is one window
    neighbours: int = DEFAULT_NEIGHBOURS  # kept per item
    max_window_behaviours: int = DEFAULT_MAX_WINDOW_BEHAVIOURS  # later behaviours paired with each

    def __post_init__(self):
        if not (self.window_hours > 0):  # also rejects NaN
            raise ValueError(f"window_hours must be > 0 (inf for the whole history), got "
                             f"{self.window_hours!r}")
        if int(self.neighbours) != self.neighbours or self.neighbours < 1:
            raise ValueError(f"neighbours must be an integer >= 1, got {self.neighbours!r}")
        if int(self.max_window_behaviours) != self.max_window_behaviours or \
                self.max_window_behaviours < 1:
            raise ValueError(f"max_window_behaviours must be an integer >= 1, got "
                             f"{self.max_window_behaviours!r}")

    @property
    def window_ms(self) -> float:
        return self.window_hours * HOUR_MS


# ---- per-user contributions (plain NumPy; the DoFns call these) ---------------------------------
def inverse_user_frequency(distinct_items: int) -> float:
    """A user's vote on each of their pairs: 1 / ln(1 + |N(u)|)."""
    return 1.0 / math.log1p(distinct_items)


def window_pairs(timestamps_ms: np.ndarray, items: np.ndarray, window_ms: float,
                 max_window_behaviours: int) -> np.ndarray:
    """int64 [P, 2] distinct pairs (i < j) of different items whose behaviours are at most
    window_ms apart; behaviour a is paired with a + 1 .. a + max_window_behaviours only.
    `timestamps_ms` must be ascending (oldest first)."""
    times = np.asarray(timestamps_ms, np.int64)
    items = np.asarray(items, np.int64)
    found = []
    for offset in range(1, min(int(max_window_behaviours), len(items) - 1) + 1):
        close = (times[offset:] - times[:-offset]) <= window_ms
        if not close.any():
            break  # times ascend, so a larger offset cannot be closer
        different = items[offset:] != items[:-offset]
        keep = close & different
        a, b = items[:-offset][keep], items[offset:][keep]
        found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    if not found:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(found), axis=0)


class ReadHistories(beam.DoFn):
    """user_id -> (user_id, (timestamps_ms ascending, item indices)) of the behaviours strictly
    before the cutoff, from the SQLite feature store (opened once per worker)."""

    def __init__(self, store_path: str, before_ms: int):
        self.store_path = store_path
        self.before_ms = int(before_ms)
        self.users = Metrics.counter(METRICS_NAMESPACE, "users")
        self.users_without_history = Metrics.counter(METRICS_NAMESPACE,
                                                     "users_without_history_before_cutoff")
        self.behaviours = Metrics.counter(METRICS_NAMESPACE, "behaviours_before_cutoff")
        self.after_cutoff = Metrics.counter(METRICS_NAMESPACE, "behaviours_at_or_after_cutoff")
        self.unknown_item = Metrics.counter(METRICS_NAMESPACE, "behaviours_unknown_item")
        self._store: Optional[SqliteFeatureStore] = None
        self._seen = 0

    def setup(self):
        self._store = SqliteFeatureStore(self.store_path)

    def process(self, user_id: str):
        # The whole history is read and cut here, so the excluded behaviours can be counted.
        arrays = self._store.behaviours_before(user_id, NEVER_MS)
        times, items = arrays["timestamp_ms"][::-1], arrays["item_index"][::-1]  # oldest first
        before = times < self.before_ms
        known = items > F.OOV_INDEX
        self.users.inc()
        self.after_cutoff.inc(int((~before).sum()))
        self.unknown_item.inc(int((before & ~known).sum()))
        keep = before & known
        self.behaviours.inc(int(keep.sum()))
        self._seen += 1
        if self._seen % 10_000 == 0:
            log.info("item-to-item: read the histories of %d users (this worker)", self._seen)
        if not keep.any():
            self.users_without_history.inc()
            return
        yield user_id, (times[keep], items[keep])

    def teardown(self):
        if self._store is not None:
            self._store.close()


def distinct_items(element) -> Iterable[Tuple[int, int]]:
    """(item, 1) once per item of the user: summed per item this is U(i)."""
    _, (_, items) = element
    for item in np.unique(items).tolist():
        yield item, 1


class PairVotes(beam.DoFn):
    """((i, j), 1 / ln(1 + |N(u)|)) for each windowed pair of the user: summed this is C(i, j)."""

    def __init__(self, window_ms: float, max_window_behaviours: int):
        self.window_ms = window_ms
        self.max_window_behaviours = max_window_behaviours
        self.user_pairs = Metrics.counter(METRICS_NAMESPACE, "user_pairs")

    def process(self, element):
        _, (times, items) = element
        pairs = window_pairs(times, items, self.window_ms, self.max_window_behaviours)
        if not len(pairs):
            return
        vote = inverse_user_frequency(len(np.unique(items)))
        self.user_pairs.inc(len(pairs))
        for i, j in pairs.tolist():
            yield (i, j), vote


class Similarities(beam.DoFn):
    """((i, j), C) -> (i, (j, sim)) and (j, (i, sim)), sim = C / sqrt(U(i) U(j))."""

    def __init__(self):
        self.pairs = Metrics.counter(METRICS_NAMESPACE, "item_pairs")

    def process(self, element, users_per_item):
        (i, j), votes = element
        self.pairs.inc()
        weight = votes / math.sqrt(users_per_item[i] * users_per_item[j])
        yield i, (j, weight)
        yield j, (i, weight)


def _strongest_first(neighbour: Tuple[int, float]):
    return neighbour[1], -neighbour[0]  # Top keeps the largest: higher weight, then lower index


def table_line(element) -> str:
    item, neighbours = element  # Top.PerKey gives them largest first
    return json.dumps({"item": int(item),
                       "neighbours": [[int(j), float(w)] for j, w in neighbours]})


def expand_item_to_item(users: beam.PCollection, store_path: str, before_ms: int,
                        settings: ItemToItemSettings) -> beam.PCollection:
    """user ids -> (item, [(neighbour, weight), ...] strongest first) of the whole table."""
    histories = (users
                 | "SpreadUsers" >> beam.Reshuffle()
                 | "ReadHistories" >> beam.ParDo(ReadHistories(store_path, before_ms)))
    users_per_item = (histories
                      | "DistinctItems" >> beam.FlatMap(distinct_items)
                      | "UsersPerItem" >> beam.CombinePerKey(sum))
    votes = (histories
             | "PairVotes" >> beam.ParDo(PairVotes(settings.window_ms,
                                                   settings.max_window_behaviours))
             | "SumVotes" >> beam.CombinePerKey(sum))
    return (votes
            | "Similarities" >> beam.ParDo(Similarities(), beam.pvalue.AsDict(users_per_item))
            | "TopNeighbours" >> beam.combiners.Top.PerKey(int(settings.neighbours),
                                                           key=_strongest_first))


# ---- driver -------------------------------------------------------------------------------------
class InputError(ValueError):
    """The preprocessing output cannot be used (raised before Beam starts)."""


def _format_ms(ms: int) -> str:
    if ms >= NEVER_MS:
        return "never (no held-out requests: every behaviour takes part)"
    when = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return f"{ms} ({when:%Y-%m-%d %H:%M:%S} UTC)"


def recorded_eval_cutoff(data_dir: str) -> Optional[Tuple[int, str]]:
    """(eval split start in ms, where it was found) from the preprocessing output's stats.json
    or metadata.json (RECORDED_CUTOFF_KEYS), or None if the run recorded no cutoff."""
    for file_name, keys in RECORDED_CUTOFF_KEYS:
        path = os.path.join(data_dir, file_name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            value: Any = json.load(f)
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return int(value), f"{file_name}: {'.'.join(keys)}"
    return None


def _check_data_dir(data_dir: str) -> Tuple[str, str]:
    if not os.path.isdir(data_dir):
        raise InputError(f"--data {data_dir} is not a directory (give the output directory of "
                         f"`python -m preprocessing`)")
    store_path = os.path.join(data_dir, FEATURE_STORE_FILE)
    if not os.path.exists(store_path):
        raise InputError(f"{store_path} not found: the behaviours come from the feature store; "
                         f"rerun `python -m preprocessing` without --no-feature-store")
    users_path = os.path.join(data_dir, F.VOCAB_DIR, "users.txt")
    if not os.path.exists(users_path):
        raise InputError(f"{users_path} not found: {data_dir} is not a complete preprocessing "
                         f"output")
    return store_path, users_path


def _clear_old_table(directory: str) -> None:
    # the manifest goes first: a half-replaced table must never look finished
    manifest = os.path.join(directory, table_format.MANIFEST_FILE)
    if os.path.exists(manifest):
        os.remove(manifest)
    for path in glob.glob(os.path.join(directory, f"{table_format.PART_PREFIX}-*")):
        os.remove(path)


def build_item_to_item(data_dir: str, before_ms: int,
                       settings: ItemToItemSettings = ItemToItemSettings(),
                       beam_args: Sequence[str] = (), workers: int = 1, progress=print,
                       cutoff_source: str = "argument", output_dir: Optional[str] = None
                       ) -> Dict[str, Any]:
    """Builds OUT/item_to_item (or `output_dir`) from OUT/feature_store.sqlite; returns the
    manifest."""
    from preprocessing.options import pipeline_options

    started = time.time()
    store_path, users_path = _check_data_dir(data_dir)
    before_ms = int(before_ms)
    out_dir = output_dir or os.path.join(data_dir, table_format.ITEM_TO_ITEM_DIR)
    if os.path.realpath(out_dir) == os.path.realpath(data_dir):
        raise InputError(f"the table's folder must not be the preprocessing output itself "
                         f"({data_dir}): give another --output")
    os.makedirs(out_dir, exist_ok=True)
    _clear_old_table(out_dir)
    progress(f"[1/3] behaviours strictly before {_format_ms(before_ms)} (cutoff from "
             f"{cutoff_source}); window {settings.window_hours:g} h, at most "
             f"{settings.max_window_behaviours} later behaviours per behaviour, "
             f"{settings.neighbours} neighbours per item")
    options, runner = pipeline_options(list(beam_args), workers)
    where = f"in-process, {workers} worker(s)" if runner else "runner from options"
    progress(f"[2/3] running the Beam pipeline ({where})")
    pipeline = beam.Pipeline(runner=runner, options=options)
    users = pipeline | "ReadUsers" >> beam.io.ReadFromText(users_path)
    (expand_item_to_item(users, store_path, before_ms, settings)
     | "TableLines" >> beam.Map(table_line)
     | "WriteTable" >> beam.io.WriteToText(
         os.path.join(out_dir, table_format.PART_PREFIX),
         file_name_suffix=table_format.PART_SUFFIX))
    result = pipeline.run()
    result.wait_until_finish()
    counts = {name: 0 for name in (
        "users", "users_without_history_before_cutoff", "behaviours_before_cutoff",
        "behaviours_at_or_after_cutoff", "behaviours_unknown_item", "user_pairs", "item_pairs")}
    for counter in result.metrics().query(MetricsFilter().with_namespace(
            METRICS_NAMESPACE))["counters"]:
        counts[counter.key.metric.name] += int(counter.committed or 0)
    neighbours = 0
    items_with_neighbours = 0
    for path in table_format.part_files(out_dir):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    items_with_neighbours += 1
                    neighbours += len(json.loads(line)["neighbours"])
    counts.update(items_with_neighbours=items_with_neighbours, neighbour_edges=neighbours)
    manifest = {
        "format_version": table_format.FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "formula": "sim(i,j) = sum_{u: i,j within window} 1/ln(1+|N(u)|) / sqrt(|U(i)| |U(j)|)",
        "before_ms": before_ms,
        "cutoff_source": cutoff_source,
        "window_hours": None if math.isinf(settings.window_hours) else settings.window_hours,
        "max_window_behaviours": int(settings.max_window_behaviours),
        "neighbours": int(settings.neighbours),
        "counts": counts,
        "seconds": round(time.time() - started, 2),
    }
    with open(os.path.join(out_dir, table_format.MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    progress(f"[3/3] {items_with_neighbours} items with neighbours ({neighbours} edges, "
             f"{counts['item_pairs']} co-occurring pairs) from "
             f"{counts['behaviours_before_cutoff']} behaviours of {counts['users']} users; "
             f"{counts['behaviours_at_or_after_cutoff']} behaviours at or after the cutoff "
             f"and {counts['behaviours_unknown_item']} of unknown items left out")
    if not items_with_neighbours:
        progress("warning: the table is empty: no user has two different items within the "
                 "window before the cutoff (check --before-ms and --window-hours)")
    progress(f"done in {manifest['seconds']:.1f}s -> {out_dir}")
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocessing.item_to_item",
        description="Builds the item-to-item table of QRCF retrieval (PR2) from the full-site "
                    "behaviours in a preprocessing output's feature store: ItemCF-IUF weights "
                    "sim(i,j) = sum over users having i and j within the time window of "
                    "1/ln(1 + their distinct items), divided by sqrt(users of i * users of j); "
                    "the top --neighbours per item are written to DATA/item_to_item/ (or "
                    "--output) "
                    "(manifest.json + part-*.jsonl, read by "
                    "common.item_to_item.read_item_to_item). Only behaviours strictly before "
                    "the cutoff are used: by default the eval split's start recorded by "
                    "preprocessing, so the evaluation is not leaked. Extra flags are Apache Beam "
                    "pipeline options.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True,
                   help="output directory of `python -m preprocessing` (holds "
                        "feature_store.sqlite and vocab/users.txt)")
    p.add_argument("--window-hours", type=float, default=DEFAULT_WINDOW_HOURS,
                   help="two behaviours of a user co-occur when at most this many hours apart; "
                        "'inf' pairs every two items of the user's history")
    p.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS,
                   help="neighbours kept per item (the highest weights)")
    p.add_argument("--max-window-behaviours", type=int, default=DEFAULT_MAX_WINDOW_BEHAVIOURS,
                   help="each behaviour is paired with at most this many of the user's next "
                        "behaviours inside the window (bounds the cost of very active users)")
    p.add_argument("--before-ms", type=int, default=None,
                   help="use only behaviours with timestamp < this (ms since the epoch). "
                        "Default: the eval split's start recorded in DATA/stats.json or "
                        "DATA/metadata.json (split_cutoffs_ms.eval); required when the "
                        "preprocessing run recorded none")
    p.add_argument("--workers", type=int, default=1,
                   help="local worker processes of the in-process runner")
    p.add_argument("--output", default=None,
                   help="write the table to this folder instead of DATA/item_to_item (readers "
                        "take it as their item-to-item path, e.g. serving.search "
                        "--item-to-item DIR)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    errors = [message for bad, message in (
        (args.workers < 1, "--workers must be >= 1"),
        (not args.window_hours > 0, "--window-hours must be > 0 ('inf': the whole history)"),
        (args.neighbours < 1, "--neighbours must be >= 1"),
        (args.max_window_behaviours < 1, "--max-window-behaviours must be >= 1")) if bad]
    if errors:
        parser.error("; ".join(errors))
    settings = ItemToItemSettings(window_hours=args.window_hours, neighbours=args.neighbours,
                                  max_window_behaviours=args.max_window_behaviours)
    try:
        _check_data_dir(args.data)
        if args.before_ms is not None:
            before_ms, source = args.before_ms, "--before-ms"
        else:
            recorded = recorded_eval_cutoff(args.data)
            if recorded is None:
                raise InputError(
                    f"{args.data} records no split cutoff (looked for "
                    f"{', '.join(f + ' ' + '.'.join(k) for f, k in RECORDED_CUTOFF_KEYS)}); "
                    f"pass --before-ms with the first eval request time (the smallest "
                    f"request_time in {os.path.join(args.data, 'eval')}), so behaviours the "
                    f"evaluation asks about stay out of the table")
            before_ms, source = recorded
        if before_ms < 0:
            raise InputError(f"the cutoff must be >= 0 ms (got {before_ms} from {source})")
        build_item_to_item(args.data, before_ms, settings, beam_args, args.workers,
                           progress=lambda msg: print(msg, flush=True), cutoff_source=source,
                           output_dir=args.output)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Run through the package module, so Beam pickles the DoFns by their importable name.
    from preprocessing.item_to_item import main as _main

    sys.exit(_main())
