"""Command-line options of `python -m preprocessing` and the Beam runner they select.

Unknown flags are Beam pipeline options and are passed through, so the same command runs
locally and on Dataflow:

    python -m preprocessing --input-format canonical --input raw --output out --workers 2
    python -m preprocessing --input-format canonical --input gs://b/raw --output gs://b/out \\
        --runner DataflowRunner --project P --region R --temp_location gs://b/tmp \\
        --setup_file ./setup.py        # or --requirements_file requirements.txt

Without --runner the pipeline runs on Beam's in-process FnApiRunner (no network: the plain
DirectRunner of Beam >= 2.68 first tries to download the Prism runner). `--workers N` (N > 1)
runs N worker processes (`--direct_num_workers N --direct_running_mode multi_processing`).
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence, Tuple

from common import features as F
from common.cli import HelpFormatter

FORMATS = ("canonical", "kuaisar", "jdsearch")
LONG_TERM_MODES = ("recent", "stage1")
DEFAULT_STAGE1_K = F.DEFAULT_STAGE1_K
DEFAULT_EVAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocessing",
        description="Raw search logs -> one tf.train.Example per search request (its candidate "
                    "list, the user's long-term and real-time behaviour sequences strictly before "
                    "the request time), split by time into train/eval/test, plus vocabularies, "
                    "item embeddings, metadata.json, stats.json, dead letters and the SQLite "
                    "feature store (docs/ARCHITECTURE.md section 2). Extra flags are Apache Beam "
                    "pipeline options (e.g. --runner DataflowRunner --project ... --region ... "
                    "--temp_location gs://... --setup_file ./setup.py).",
        formatter_class=HelpFormatter)
    p.add_argument("--input-format", choices=FORMATS, required=True,
                   help="layout of --input: canonical (docs/ARCHITECTURE.md section 1 Parquet "
                        "files), kuaisar (KuaiSAR CSVs) or jdsearch (JDsearch files)")
    p.add_argument("--input", required=True, help="input directory (local or gs://)")
    p.add_argument("--output", required=True,
                   help="output directory; train/eval/test TFRecords, metadata.json, ...")
    p.add_argument("--long-term-length", type=int, default=F.DEFAULT_LONG_TERM_LENGTH,
                   help="maximum behaviours in the long-term sequence")
    p.add_argument("--real-time-length", type=int, default=F.DEFAULT_REAL_TIME_LENGTH,
                   help="behaviours in the real-time sequence (the most recent before the "
                        "request)")
    p.add_argument("--max-candidates", type=int, default=F.DEFAULT_MAX_CANDIDATES,
                   help="candidates kept per request (the first ones as logged; the rest are "
                        "counted as truncated)")
    p.add_argument("--long-term-mode", choices=LONG_TERM_MODES, default="recent",
                   help="recent: the most recent --long-term-length behaviours; stage1: the "
                        "--stage1-k behaviours of the whole history before the request most "
                        "similar to the query (cosine of content embeddings, "
                        "common.relevance.stage1_top_k), ordered most recent first")
    p.add_argument("--stage1-k", type=int, default=DEFAULT_STAGE1_K,
                   help="K1 of --long-term-mode stage1")
    p.add_argument("--stage1-threshold", type=float, default=None,
                   help="stage1 keeps only behaviours with cosine >= this (PR2's epsilon)")
    p.add_argument("--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION,
                   help="fraction of requests (by time, before the test part) held out for eval")
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help="fraction of requests (the latest in time) held out for test")
    p.add_argument("--num-shards", type=int, default=0,
                   help="TFRecord shards per split (0: let the runner decide)")
    p.add_argument("--workers", type=int, default=1,
                   help="local worker processes (in-process runner only; 2 uses both cores)")
    p.add_argument("--embedding-dim", type=int, default=None,
                   help="expected embedding dimension (default: read from the input)")
    p.add_argument("--query-token-buckets", type=int, default=F.DEFAULT_QUERY_TOKEN_BUCKETS,
                   help="query token ids are hashed into [1, buckets)")
    p.add_argument("--profile-buckets", type=int, default=F.DEFAULT_PROFILE_BUCKETS,
                   help="user-profile values are hashed into [1, buckets)")
    text = p.add_argument_group(
        "text embeddings (kuaisar, jdsearch: prepare() trains a query/item text tower; see "
        "preprocessing/text_embeddings.py, whose TextTowerConfig holds the defaults of these "
        "options)")
    text.add_argument("--seed", type=int, default=None, help="seed of the text tower")
    text.add_argument("--text-tower-epochs", type=int, default=None, help="training epochs")
    text.add_argument("--text-tower-max-steps", type=int, default=None,
                      help="cap on training steps")
    text.add_argument("--text-tower-batch-size", type=int, default=None, help="batch size")
    text.add_argument("--text-tower-coengagement-share", type=float, default=None,
                      help="share of feed co-engagement item pairs (deep engagements of one "
                           "user close in time, before the eval cutoff) among the tower's "
                           "training pairs; 0 = off (the default: clicks only)")
    text.add_argument("--text-tower-coengagement-window", type=int, default=None,
                      help="two deep engagements pair when at most this many feed behaviours "
                           "apart")
    text.add_argument("--text-tower-coengagement-weight", type=float, default=None,
                      help="loss weight of a co-engagement pair")
    text.add_argument("--text-tower-coengagement-max-gap-s", type=float, default=None,
                      help="and at most this many seconds apart (0 = no limit)")
    text.add_argument("--text-tower-coengagement-min-watch-ratio", type=float, default=None,
                      help="watch ratio from which a feed behaviour is deep (a like is deep "
                           "too)")
    p.add_argument("--no-feature-store", action="store_true",
                   help="skip writing OUT/feature_store.sqlite")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    """(our options, the remaining Beam pipeline options); invalid values exit with a message."""
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    errors = []
    for name in ("long_term_length", "real_time_length", "max_candidates", "workers"):
        if getattr(args, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1")
    if args.stage1_k < 1:
        errors.append("--stage1-k must be >= 1")
    if args.num_shards < 0:
        errors.append("--num-shards must be >= 0")
    for name in ("eval_fraction", "test_fraction"):
        if not 0.0 <= getattr(args, name) < 1.0:
            errors.append(f"--{name.replace('_', '-')} must be in [0, 1)")
    if args.eval_fraction + args.test_fraction >= 1.0:
        errors.append("--eval-fraction + --test-fraction must be < 1 (something must be left "
                      "to train on)")
    if args.stage1_threshold is not None and not -1.0 <= args.stage1_threshold <= 1.0:
        errors.append("--stage1-threshold is a cosine: it must be in [-1, 1]")
    if errors:
        parser.error("; ".join(errors))
    return args, beam_args


def pipeline_options(beam_args: Sequence[str], workers: int = 1):
    """(PipelineOptions, runner): the in-process FnApiRunner unless --runner names another."""
    from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions,
                                                      StandardOptions)

    options = PipelineOptions(list(beam_args))
    runner_name = options.view_as(StandardOptions).runner
    if runner_name in (None, "DirectRunner", "FnApiRunner", "BundleBasedDirectRunner"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        direct = options.view_as(DirectOptions)
        if workers > 1:
            direct.direct_num_workers = workers
            direct.direct_running_mode = "multi_processing"
        elif direct.direct_num_workers and direct.direct_num_workers > 1 and \
                direct.direct_running_mode == "in_memory":
            direct.direct_running_mode = "multi_processing"
        return options, FnApiRunner()
    return options, None
