"""Exports a trained ranking model as a TF Serving version: `<base>/<model_name>/<version>/`.

    python -m serving.export --model-dir M --data OUT --base-path B [--model-name qin]
                             [--version V] [--warmup-requests 8] [--no-verify]

The version folder holds a SavedModel whose graph uses stock TensorFlow ops only (the item
embedding table is inside it), with the signatures of `serving.signatures` (serving_default,
classify_<task>, regress_<task>, regress_score, rank_listwise) and the warmup file
`assets.extra/tf_serving_warmup_requests` built from real requests of the test split.

Publication never shows a server a half-written version (TF Serving only loads numeric
folders). On a local or mounted filesystem everything is written to a hidden, non-numeric
`.tmp-export-*` folder next to the versions, verified there, and renamed to its version number
in one atomic step. A remote base path (gs://, or any filesystem tf.io.gfile can write) has no
atomic rename: the version is written and verified in a local staging folder, uploaded to a
non-numeric `.tmp-export-*` folder of the model root, copied to its numeric folder with
saved_model.pb last (until then the folder holds no loadable SavedModel) and every size checked.
Either way the last file written is the completion marker `<version>/export_complete.json`
(file sizes), which tools can require before trusting a version. A failed or interrupted export
removes its temporary and partial folders; a killed one may leave a `.tmp-export-*` folder,
which no server picks up. Versions are immutable: an existing version is never overwritten.

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
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence

from common import features as F
from common.cli import HelpFormatter
from serving import savedmodel_check, signatures as S, warmup as W

TMP_PREFIX = ".tmp-export-"
COMPLETION_MARKER = "export_complete.json"
DEFAULT_WARMUP_REQUESTS = 8
_NUMERIC = re.compile(r"^\d+$")


class ExportError(RuntimeError):
    """The export cannot proceed; the message says what to change."""


def _log(message: str) -> None:
    print(f"[export {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- filesystem: local paths through os (atomic rename), remote ones through tf.io.gfile ----
def is_remote(path: str) -> bool:
    """True for a URL-style path (gs://, s3://, ram://, ...): no atomic directory rename."""
    return "://" in path


def _join(parent: str, name: str) -> str:
    return parent.rstrip("/") + "/" + name if is_remote(parent) else os.path.join(parent, name)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def _exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def _listdir(path: str) -> List[str]:
    if not _isdir(path):
        return []
    if is_remote(path):  # object stores list sub-folders as "name/"
        return [name.rstrip("/") for name in _gfile().listdir(path)]
    return os.listdir(path)


def numeric_versions(model_root: str) -> List[int]:
    """Version numbers present under `<base>/<model_name>` (numeric folder names only)."""
    return sorted(int(name) for name in _listdir(model_root)
                  if _NUMERIC.match(name) and _isdir(_join(model_root, name)))


def next_version(model_root: str) -> int:
    """One more than the largest existing version, 1 for the first."""
    versions = numeric_versions(model_root)
    return versions[-1] + 1 if versions else 1


def leftover_temp_dirs(model_root: str) -> List[str]:
    """Temporary folders of exports that were killed (safe to delete when none is running)."""
    return sorted(n for n in _listdir(model_root) if n.startswith(TMP_PREFIX))


def resolve_version(base_path: str, model_name: str, version: Optional[int] = None):
    """(model root, version, final version dir) after checking the export can go there.

    `base_path` is a local or mounted folder, or a URL of a filesystem TensorFlow can write
    (gs://, or any scheme registered with tf.io.gfile). Raises ExportError for a model name
    that is not a plain folder name, a non-positive version, a version that already exists or
    a remote filesystem TensorFlow cannot reach.
    """
    if not re.match(r"^[A-Za-z0-9_.-]+$", model_name):
        raise ExportError(f"--model-name {model_name!r} must be a plain folder name")
    if is_remote(base_path):
        import tensorflow as tf

        model_root = _join(base_path, model_name)
        try:
            _exists(model_root)
        except tf.errors.OpError as e:
            raise ExportError(f"--base-path {base_path!r} cannot be reached through "
                              f"tf.io.gfile: {e}") from None
    else:
        model_root = os.path.join(os.path.abspath(base_path), model_name)
    if version is None:
        version = next_version(model_root)
    if version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    final_dir = _join(model_root, str(version))
    if _exists(final_dir):
        raise ExportError(f"{final_dir} already exists: versions are immutable; omit --version "
                          f"to take the next one ({next_version(model_root)})")
    return model_root, version, final_dir


# ---- publication -------------------------------------------------------------------------------
def staged_folders(staging_dir: str) -> List[str]:
    """Relative paths of every sub-folder of a written version (empty ones included)."""
    return sorted(os.path.relpath(os.path.join(parent, name), staging_dir)
                  for parent, names, _ in os.walk(staging_dir) for name in names)


def staged_files(staging_dir: str) -> List[str]:
    """Relative paths of every file of a written version, in publication order: saved_model.pb
    (what a loader opens first) last, so a folder caught mid-copy holds no loadable SavedModel."""
    files = []
    for parent, _, names in os.walk(staging_dir):
        for name in names:
            files.append(os.path.relpath(os.path.join(parent, name), staging_dir))
    return sorted(files, key=lambda rel: (rel == S.SAVED_MODEL_FILE, rel))


def _file_sizes(staging_dir: str, files: Sequence[str]) -> Dict[str, int]:
    return {rel: os.path.getsize(os.path.join(staging_dir, rel)) for rel in files}


def _completion_record(version: int, model_name: str, sizes: Dict[str, int]) -> str:
    return json.dumps({"model_name": model_name, "version": version,
                       "published_unix_s": round(time.time(), 3), "files": sizes},
                      indent=2, sort_keys=True)


def read_completion_marker(version_dir: str) -> Optional[Dict[str, Any]]:
    """The completion record of a published version, or None while it is being published (or
    when its publication was killed)."""
    path = _join(version_dir, COMPLETION_MARKER)
    if not _exists(path):
        return None
    if is_remote(path):
        with _gfile().GFile(path) as f:
            return json.load(f)
    with open(path) as f:
        return json.load(f)


def _copy_file(source: str, destination: str) -> None:
    """One file to a remote filesystem (a server-side copy when both are on the same store)."""
    _gfile().copy(source, destination, overwrite=False)


def _copy_tree(source_root: str, destination_root: str, folders: Sequence[str],
               files: Sequence[str], sizes: Dict[str, int]) -> None:
    """Copies `files` (relative, in order) and checks every copy has its expected size."""
    gfile = _gfile()
    gfile.makedirs(destination_root)
    for folder in folders:
        gfile.makedirs(_join(destination_root, folder.replace(os.sep, "/")))
    for rel in files:
        destination = _join(destination_root, rel.replace(os.sep, "/"))
        _copy_file(_join(source_root, rel.replace(os.sep, "/")) if is_remote(source_root)
                   else os.path.join(source_root, rel), destination)
        copied = gfile.stat(destination).length
        if copied != sizes[rel]:
            raise ExportError(f"{destination} has {copied} bytes after the copy, expected "
                              f"{sizes[rel]}")


def _remove_copy(root: str, folders: Sequence[str], files: Sequence[str]) -> None:
    """Removes what `_copy_tree` wrote under `root`, saved_model.pb first (a partial version is
    never loadable while it goes), then the other files and the folders, deepest first. Named
    one by one rather than listed: some filesystems list `assets.extra` inside `assets`."""
    gfile = _gfile()
    for rel in sorted(list(files) + [COMPLETION_MARKER], key=lambda r: r != S.SAVED_MODEL_FILE):
        path = _join(root, rel.replace(os.sep, "/"))
        if gfile.exists(path):
            gfile.remove(path)
    for folder in sorted(folders, reverse=True):
        path = _join(root, folder.replace(os.sep, "/"))
        if gfile.exists(path):
            gfile.rmtree(path)
    if gfile.exists(root):
        gfile.rmtree(root)


def publish_local(staging_dir: str, final_dir: str, version: int, model_name: str) -> None:
    """Marks the verified version complete and renames it into place in one atomic step."""
    files = staged_files(staging_dir)
    with open(os.path.join(staging_dir, COMPLETION_MARKER), "w") as f:
        f.write(_completion_record(version, model_name, _file_sizes(staging_dir, files)))
    if os.path.exists(final_dir):
        raise ExportError(f"{final_dir} appeared while exporting (another export?); "
                          f"nothing was published")
    os.rename(staging_dir, final_dir)  # atomic on one filesystem: the version appears whole


def publish_remote(staging_dir: str, model_root: str, final_dir: str, version: int,
                   model_name: str, log: Callable[[str], None] = _log) -> None:
    """Publishes a verified local version to a remote model root without an atomic rename.

    1. upload to `<model_root>/.tmp-export-*` (non-numeric: TF Serving never loads it);
    2. copy it to `<model_root>/<version>/` with saved_model.pb last, so until the copy is
       whole the numeric folder holds no SavedModel a server could load;
    3. write the completion marker `<version>/export_complete.json` (file sizes) last.
    Each copy is checked against the local size. On failure or interruption the temporary
    folder and a partial version folder are removed; nothing half-copied stays numeric.
    """
    import tensorflow as tf

    gfile = _gfile()
    folders, files = staged_folders(staging_dir), staged_files(staging_dir)
    sizes = _file_sizes(staging_dir, files)
    remote_tmp = _join(model_root, os.path.basename(staging_dir))
    version_started = False
    try:
        log(f"uploading {len(files)} files ({sum(sizes.values()) / 1e6:.1f} MB) to {remote_tmp}")
        _copy_tree(staging_dir, remote_tmp, folders, files, sizes)
        if gfile.exists(final_dir):
            raise ExportError(f"{final_dir} appeared while exporting (another export?); "
                              f"nothing was published")
        version_started = True
        _copy_tree(remote_tmp, final_dir, folders, files, sizes)
        with gfile.GFile(_join(final_dir, COMPLETION_MARKER), "w") as f:
            f.write(_completion_record(version, model_name, sizes))
        version_started = False
    except tf.errors.OpError as e:
        raise ExportError(f"publishing to {model_root} failed: {e}") from None
    finally:
        for leftover in ([final_dir] if version_started else []) + [remote_tmp]:
            try:
                _remove_copy(leftover, folders, files)
            except tf.errors.OpError as e:  # servers ignore a non-numeric leftover
                log(f"warning: could not remove {leftover}: {e}")


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
    remote = is_remote(model_root)
    if remote:
        _gfile().makedirs(model_root)
    else:
        os.makedirs(model_root, exist_ok=True)
    stale = leftover_temp_dirs(model_root)
    if stale:
        log(f"note: {len(stale)} temporary folder(s) of earlier interrupted exports remain "
            f"under {model_root} ({', '.join(stale[:3])}); servers ignore them")

    # A remote version is written and verified in a local staging folder, then uploaded.
    staging_root = tempfile.mkdtemp(prefix="qin-export-") if remote else model_root
    tmp_dir = os.path.join(staging_root, f"{TMP_PREFIX}{version}-{os.getpid()}-"
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
            sampled = min(warmup_requests, len(sample_requests))
            log(f"wrote {len(logs)} warmup records from {sampled}"
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
        if remote:
            publish_remote(tmp_dir, model_root, final_dir, version, model_name, log)
        else:
            publish_local(tmp_dir, final_dir, version, model_name)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    finally:
        if remote:
            shutil.rmtree(staging_root, ignore_errors=True)
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
                    "TensorFlow process and renamed into place atomically (remote base paths: "
                    "uploaded under a non-numeric name, then copied with saved_model.pb last "
                    "and a completion marker).",
        formatter_class=HelpFormatter)
    p.add_argument("--model-dir", required=True,
                   help="trainer output (model_config.json and final/ weights of "
                        "`python -m trainer.task`)")
    p.add_argument("--data", required=True,
                   help="preprocessing output: metadata.json, item_embeddings.npy and test/ "
                        "TFRecords (warmup samples)")
    p.add_argument("--base-path", required=True,
                   help="TF Serving model base path root; the version goes to "
                        "<base-path>/<model-name>/<version>/ (local folder, or gs:// and other "
                        "filesystems of tf.io.gfile: staged locally, then uploaded)")
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
