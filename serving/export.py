"""Exports a trained ranking model as a TF Serving version: `<base>/<model_name>/<version>/`.

    python -m serving.export --model-dir M --data OUT --base-path B [--model-name qin]
                             [--version V] [--warmup-requests 8] [--no-verify]

The version folder holds a SavedModel whose graph uses stock TensorFlow ops only (the item
embedding table is inside it), with the signatures of `serving.signatures` (serving_default,
classify_<task>, regress_<task>, regress_score, rank_listwise) and the warmup file
`assets.extra/tf_serving_warmup_requests` built from real requests of the test split.

Atomic publication: everything is written to a hidden, non-numeric folder next to the versions
(TF Serving only loads numeric folders), verified there, and renamed to its version number in
one step, so a server polling the base path never sees a half-written version. A failed or
interrupted export removes its temporary folder; a killed one leaves only a `.tmp-export-*`
folder, which no server picks up. Versions are immutable: an existing version is never
overwritten.

Verification (on by default): before the rename, the version is loaded in a fresh Python
process that imports only TensorFlow (as stock TF Serving would, without this project, ScaNN or
TFRS) and every warmup call must give the in-process outputs (tolerance 1e-5), through both
`tf.saved_model.load` and the session API that TF Serving and saved_model_cli use.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence

from common import features as F
from serving import savedmodel_check, signatures as S, warmup as W

TMP_PREFIX = ".tmp-export-"
DEFAULT_WARMUP_REQUESTS = 8
_NUMERIC = re.compile(r"^\d+$")


class ExportError(RuntimeError):
    """The export cannot proceed; the message says what to change."""


def _log(message: str) -> None:
    print(f"[export {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def numeric_versions(model_root: str) -> List[int]:
    """Version numbers present under `<base>/<model_name>` (numeric folder names only)."""
    if not os.path.isdir(model_root):
        return []
    return sorted(int(name) for name in os.listdir(model_root)
                  if _NUMERIC.match(name) and os.path.isdir(os.path.join(model_root, name)))


def next_version(model_root: str) -> int:
    """One more than the largest existing version, 1 for the first."""
    versions = numeric_versions(model_root)
    return versions[-1] + 1 if versions else 1


def leftover_temp_dirs(model_root: str) -> List[str]:
    """Temporary folders of exports that were killed (safe to delete when none is running)."""
    if not os.path.isdir(model_root):
        return []
    return sorted(n for n in os.listdir(model_root) if n.startswith(TMP_PREFIX))


def resolve_version(base_path: str, model_name: str, version: Optional[int] = None):
    """(model root, version, final version dir) after checking the export can go there.

    Raises ExportError for a remote base path (no atomic rename), a model name that is not a
    plain folder name, a non-positive version, or a version that already exists.
    """
    if "://" in base_path:
        raise ExportError(f"--base-path {base_path!r} is remote; only a local or mounted "
                          "filesystem gives an atomic rename. Export locally, then copy the "
                          "version folder under a non-numeric name and rename it in place.")
    if not re.match(r"^[A-Za-z0-9_.-]+$", model_name):
        raise ExportError(f"--model-name {model_name!r} must be a plain folder name")
    model_root = os.path.join(os.path.abspath(base_path), model_name)
    if version is None:
        version = next_version(model_root)
    if version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    final_dir = os.path.join(model_root, str(version))
    if os.path.exists(final_dir):
        raise ExportError(f"{final_dir} already exists: versions are immutable; omit --version "
                          f"to take the next one ({next_version(model_root)})")
    return model_root, version, final_dir


def check_warmup_requests(count: int) -> None:
    if count < 0 or count * W.RECORDS_PER_REQUEST > W.MAX_WARMUP_RECORDS:
        raise ExportError(f"--warmup-requests must be within 0..."
                          f"{W.MAX_WARMUP_RECORDS // W.RECORDS_PER_REQUEST} (TF Serving reads at "
                          f"most {W.MAX_WARMUP_RECORDS} records, {W.RECORDS_PER_REQUEST} per "
                          f"request)")


def export_model(model, metadata: F.DatasetMetadata, base_path: str, model_name: str = "qin",
                 version: Optional[int] = None, sample_requests: Sequence[bytes] = (),
                 warmup_requests: int = DEFAULT_WARMUP_REQUESTS, verify: bool = True,
                 log: Callable[[str], None] = _log) -> Dict[str, Any]:
    """Writes `model` as version `version` (default: next) of `<base_path>/<model_name>`.

    `sample_requests` are serialized request examples (real traffic, e.g. the test split); the
    first `warmup_requests` of them become the warmup file, and they drive verification.
    Returns a summary dict (export_dir, version, signatures, warmup_records, verification).
    """
    model_root, version, final_dir = resolve_version(base_path, model_name, version)
    check_warmup_requests(warmup_requests)
    if (warmup_requests or verify) and not sample_requests:
        raise ExportError("warmup and verification need sample requests; pass "
                          "--warmup-requests 0 --no-verify to export without them")
    os.makedirs(model_root, exist_ok=True)
    stale = leftover_temp_dirs(model_root)
    if stale:
        log(f"note: {len(stale)} temporary folder(s) of earlier interrupted exports remain "
            f"under {model_root} ({', '.join(stale[:3])}); servers ignore them")

    tmp_dir = os.path.join(model_root, f"{TMP_PREFIX}{version}-{os.getpid()}-"
                                       f"{uuid.uuid4().hex[:8]}")
    try:
        log(f"tracing and saving {len(S.signature_names(metadata.tasks))} signatures "
            f"to {tmp_dir}")
        start = time.time()
        fns = S.save_servable(model, metadata, tmp_dir)
        log(f"saved in {time.time() - start:.1f}s")
        logs = W.build_warmup_logs(list(sample_requests[:warmup_requests]), metadata,
                                   model_name)
        if logs:
            path = W.write_warmup(tmp_dir, logs)
            log(f"wrote {len(logs)} warmup records from {min(warmup_requests, len(sample_requests))}"
                f" test requests to {os.path.relpath(path, tmp_dir)}")
        else:
            log("no warmup file (--warmup-requests 0): the first live requests pay the "
                "graph warm-up cost")
        verification = None
        if verify:
            log("verifying in a clean TensorFlow process (no project code, ScaNN or TFRS)")
            verify_logs = logs or W.build_warmup_logs(list(sample_requests[:2]), metadata,
                                                      model_name)
            calls = W.warmup_calls(verify_logs)
            examples = next(inputs[S.INPUTS] for name, inputs in calls
                            if name == S.SERVING_DEFAULT)
            multi_names = S.example_signature_names(metadata.tasks)
            verification = savedmodel_check.verify(tmp_dir, fns, calls,
                                                   multi=(multi_names, examples))
            log(f"verified {verification['calls']} calls, max abs difference "
                f"{verification['max_abs_difference']:.2e}")
        if os.path.exists(final_dir):
            raise ExportError(f"{final_dir} appeared while exporting (another export?); "
                              f"nothing was published")
        os.rename(tmp_dir, final_dir)  # atomic on one filesystem: the version appears whole
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log(f"published {final_dir}")
    return {"export_dir": final_dir, "version": version, "model_name": model_name,
            "signatures": S.signature_names(metadata.tasks),
            "warmup_records": len(logs), "verification": verification}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.export",
        description="Export a trained ranking model as a TensorFlow Serving version "
                    "<base-path>/<model-name>/<version>/ (SavedModel with serving_default, "
                    "classify_<task>, regress_<task>, regress_score and rank_listwise "
                    "signatures, stock TF ops only, plus a warmup file of real test requests). "
                    "The version is written to a hidden temporary folder, verified in a clean "
                    "TensorFlow process and renamed into place atomically.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", required=True,
                   help="trainer output (model_config.json and final/ weights of "
                        "`python -m trainer.task`)")
    p.add_argument("--data", required=True,
                   help="preprocessing output: metadata.json, item_embeddings.npy and test/ "
                        "TFRecords (warmup samples)")
    p.add_argument("--base-path", required=True,
                   help="TF Serving model base path root; the version goes to "
                        "<base-path>/<model-name>/<version>/ (local or mounted filesystem)")
    p.add_argument("--model-name", default="qin", help="model name (folder under base path)")
    p.add_argument("--version", type=int, default=None,
                   help="version number (default: one more than the largest existing numeric "
                        "folder, 1 for the first); an existing version is never overwritten")
    p.add_argument("--warmup-requests", type=int, default=DEFAULT_WARMUP_REQUESTS,
                   help=f"test requests turned into warmup records ({W.RECORDS_PER_REQUEST} "
                        f"records each: listwise Predict, per-example Predict, Classify, Regress, "
                        f"MultiInference); 0 writes no warmup file")
    p.add_argument("--warmup-split", default="test", choices=F.SPLITS,
                   help="split the sample requests come from")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the clean-process reload check (not recommended)")
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM (a cancelled pipeline step) must clean the temporary folder like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        resolve_version(args.base_path, args.model_name, args.version)  # fail before loading
        check_warmup_requests(args.warmup_requests)
        metadata = F.DatasetMetadata.load(args.data)
        verify = not args.no_verify
        samples: List[bytes] = []
        wanted = max(args.warmup_requests, 2 if verify else 0)
        if wanted:
            samples = W.read_sample_requests(args.data, wanted, args.warmup_split)
            _log(f"read {len(samples)} sample requests from {args.warmup_split}/")
        _log(f"loading the trained model from {args.model_dir}")
        from trainer.model import load_trained_model

        model = load_trained_model(args.model_dir, args.data)
        summary = export_model(model, metadata, args.base_path, args.model_name, args.version,
                               samples, args.warmup_requests, verify)
    except (ExportError, FileNotFoundError, ValueError,
            savedmodel_check.SavedModelMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
