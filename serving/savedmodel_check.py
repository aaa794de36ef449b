"""Save -> reload -> same outputs: runs an exported SavedModel in a clean TensorFlow process.

Stock TF Serving has nothing of this project: no `common`, no `trainer`, no ScaNN, no TFRS.
`run_clean` proves a version works there by loading it in a fresh interpreter (`python -I`,
no PYTHONPATH, empty working directory) that imports only TensorFlow, and running signatures
two ways:

* TF2: `tf.saved_model.load(dir).signatures[name](**inputs)`;
* session: `tf.compat.v1.saved_model.loader.load` and `session.run` on the SignatureDef's
  tensor names, which is how TF Serving and `saved_model_cli run` execute a model. For the
  example signatures it also fetches every requested example signature in ONE run fed once
  through their shared `inputs` tensor, as TF Serving's MultiInference does.

It also lists every op type of the graph and its function library that the clean process has
no kernel registration for, or that calls back into Python (py_function), and which modules
beyond TensorFlow were imported. `verify` compares everything against in-process reference
outputs and raises `SavedModelMismatch` listing every difference.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# Top-level modules that must never be needed to load or run an exported version.
FORBIDDEN_MODULES = ("common", "serving", "trainer", "preprocessing", "pipelines", "tests",
                     "scann", "tensorflow_recommenders")
PYTHON_CALLBACK_OPS = ("PyFunc", "PyFuncStateless", "EagerPyFunc")

# One call = (signature name, {input key: NumPy array}).
Call = Tuple[str, Dict[str, np.ndarray]]

_CHILD = r'''
import os, pickle, sys, time
with open(sys.argv[1], "rb") as f:
    job = pickle.load(f)
start = time.time()
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

report = {"python": sys.executable, "tf_version": tf.__version__, "tf2": [], "session": [],
          "multi": None, "errors": []}
export_dir = job["export_dir"]

loaded = tf.saved_model.load(export_dir)
report["signatures"] = sorted(loaded.signatures.keys())
for name, inputs in job["calls"]:
    try:
        fn = loaded.signatures[name]
        out = fn(**{k: tf.constant(v) for k, v in inputs.items()})
        report["tf2"].append({k: v.numpy() for k, v in out.items()})
    except Exception as e:  # reported, compared by the parent
        report["tf2"].append(None)
        report["errors"].append(f"tf2 {name}: {type(e).__name__}: {e}")

graph = tf.Graph()
with tf.compat.v1.Session(graph=graph) as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export_dir)
    report["methods"] = {k: v.method_name for k, v in meta.signature_def.items()}
    for name, inputs in job["calls"]:
        try:
            sig = meta.signature_def[name]
            feed = {sig.inputs[k].name: v for k, v in inputs.items()}
            fetch = {k: t.name for k, t in sig.outputs.items()}
            report["session"].append(sess.run(fetch, feed_dict=feed))
        except Exception as e:
            report["session"].append(None)
            report["errors"].append(f"session {name}: {type(e).__name__}: {e}")
    multi = job.get("multi")
    if multi:
        names, serialized = multi
        input_tensors = sorted({meta.signature_def[n].inputs["inputs"].name for n in names})
        report["multi_input_tensors"] = input_tensors
        if len(input_tensors) == 1:
            fetch = {(n, k): t.name for n in names
                     for k, t in meta.signature_def[n].outputs.items()}
            try:
                report["multi"] = sess.run(fetch, feed_dict={input_tensors[0]: serialized})
            except Exception as e:
                report["errors"].append(f"multi: {type(e).__name__}: {e}")

    ops = set(n.op for n in meta.graph_def.node)
    for fdef in meta.graph_def.library.function:
        ops.update(n.op for n in fdef.node_def)
    library = {f.signature.name for f in meta.graph_def.library.function}
    report["op_types"] = sorted(ops)
    report["unregistered_ops"] = sorted(
        op for op in ops if op not in library and op_def_registry.get(op) is None)

report["modules"] = sorted({m.split(".")[0] for m in sys.modules})
report["seconds"] = time.time() - start
with open(sys.argv[2], "wb") as f:
    pickle.dump(report, f)
'''


class SavedModelMismatch(AssertionError):
    """The reloaded SavedModel disagrees with the in-process model, or needs non-stock code."""


@dataclasses.dataclass
class CleanRun:
    """What the clean process saw; outputs are aligned with the calls passed to `run_clean`."""

    tf2: List[Optional[Dict[str, np.ndarray]]]
    session: List[Optional[Dict[str, np.ndarray]]]
    multi: Optional[Dict[Tuple[str, str], np.ndarray]]
    multi_input_tensors: List[str]
    signatures: List[str]
    methods: Dict[str, str]
    op_types: List[str]
    unregistered_ops: List[str]
    modules: List[str]
    errors: List[str]
    seconds: float

    @property
    def forbidden_modules(self) -> List[str]:
        return [m for m in FORBIDDEN_MODULES if m in self.modules]

    @property
    def python_callback_ops(self) -> List[str]:
        return [op for op in self.op_types if op in PYTHON_CALLBACK_OPS]


def run_clean(export_dir: str, calls: Sequence[Call],
              multi: Optional[Tuple[Sequence[str], np.ndarray]] = None,
              timeout_s: float = 300.0) -> CleanRun:
    """Loads `export_dir` in a fresh interpreter that imports only TensorFlow and runs `calls`
    (and optionally `multi` = (example signature names, serialized examples) in one run).

    Raises RuntimeError with the child's stderr when the process itself fails.
    """
    export_dir = os.path.abspath(export_dir)
    with tempfile.TemporaryDirectory(prefix="savedmodel_check_") as work:
        job_path, out_path = os.path.join(work, "job.pkl"), os.path.join(work, "out.pkl")
        with open(job_path, "wb") as f:
            pickle.dump({"export_dir": export_dir, "calls": list(calls),
                         "multi": (list(multi[0]), multi[1]) if multi else None}, f)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PYTHON") and k != "TF_USE_LEGACY_KERAS"}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        proc = subprocess.run([sys.executable, "-I", "-c", _CHILD, job_path, out_path],
                              cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"the clean TensorFlow process failed on {export_dir} "
                               f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out_path, "rb") as f:
            report = pickle.load(f)
    return CleanRun(tf2=report["tf2"], session=report["session"], multi=report["multi"],
                    multi_input_tensors=report.get("multi_input_tensors", []),
                    signatures=report["signatures"], methods=report["methods"],
                    op_types=report["op_types"], unregistered_ops=report["unregistered_ops"],
                    modules=report["modules"], errors=report["errors"],
                    seconds=report["seconds"])


def reference_outputs(signature_fns: Mapping[str, Any], calls: Sequence[Call]
                      ) -> List[Dict[str, np.ndarray]]:
    """In-process outputs of `calls` through the concrete functions that were saved."""
    import tensorflow as tf

    results = []
    for name, inputs in calls:
        out = signature_fns[name](**{k: tf.constant(v) for k, v in inputs.items()})
        results.append({k: v.numpy() for k, v in out.items()})
    return results


def compare(expected: Mapping[str, np.ndarray], actual: Optional[Mapping[str, np.ndarray]],
            atol: float, where: str) -> Tuple[float, List[str]]:
    """(max abs difference, problems) between two output dicts of one call."""
    if actual is None:
        return float("inf"), [f"{where}: no outputs"]
    problems, worst = [], 0.0
    if set(expected) != set(actual):
        problems.append(f"{where}: output keys {sorted(actual)} != {sorted(expected)}")
    for key in sorted(set(expected) & set(actual)):
        e, a = np.asarray(expected[key]), np.asarray(actual[key])
        if e.shape != a.shape:
            problems.append(f"{where}/{key}: shape {a.shape} != {e.shape}")
        elif e.dtype.kind in "SOU":
            if not np.array_equal(e.astype(bytes), a.astype(bytes)):
                problems.append(f"{where}/{key}: strings differ")
        elif e.size:
            diff = float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64))))
            worst = max(worst, diff)
            if not diff <= atol:
                problems.append(f"{where}/{key}: max abs difference {diff:.3g} > {atol:g}")
    return worst, problems


def check_run(run: CleanRun, signature_fns: Mapping[str, Any], calls: Sequence[Call],
              multi: Optional[Tuple[Sequence[str], np.ndarray]] = None, atol: float = 1e-5,
              where: str = "the SavedModel") -> Dict[str, Any]:
    """Raises SavedModelMismatch unless `run` (from `run_clean` with the same calls and multi)
    reproduces the in-process `signature_fns` within `atol` on both paths and needed only
    stock ops and no project code. Returns a summary (max difference, op count)."""
    expected = reference_outputs(signature_fns, calls)
    problems = list(run.errors)
    if run.forbidden_modules:
        problems.append(f"the clean process imported {run.forbidden_modules}")
    if run.unregistered_ops:
        problems.append(f"ops not in stock TensorFlow: {run.unregistered_ops}")
    if run.python_callback_ops:
        problems.append(f"ops that call back into Python: {run.python_callback_ops}")
    worst = 0.0
    for k, ((name, _), exp) in enumerate(zip(calls, expected)):
        for path, got in (("tf2", run.tf2[k]), ("session", run.session[k])):
            diff, issues = compare(exp, got, atol, f"{path} {name} call {k}")
            worst, problems = max(worst, diff), problems + issues
    if multi:
        names, serialized = multi
        if len(run.multi_input_tensors) != 1:
            problems.append(f"example signatures {list(names)} read different input tensors "
                            f"{run.multi_input_tensors}: TF Serving's MultiInference needs one")
        elif run.multi is not None:
            for name in names:
                exp = reference_outputs(signature_fns, [(name, {"inputs": serialized})])[0]
                got = {k: v for (n, k), v in run.multi.items() if n == name}
                diff, issues = compare(exp, got, atol, f"multi {name}")
                worst, problems = max(worst, diff), problems + issues
    if problems:
        raise SavedModelMismatch(f"{where} does not reproduce the in-process model:\n  "
                                 + "\n  ".join(problems))
    return {"max_abs_difference": worst, "calls": len(calls), "op_types": len(run.op_types),
            "clean_process_seconds": run.seconds}


def verify(export_dir: str, signature_fns: Mapping[str, Any], calls: Sequence[Call],
           multi: Optional[Tuple[Sequence[str], np.ndarray]] = None, atol: float = 1e-5,
           timeout_s: float = 300.0) -> Dict[str, Any]:
    """`run_clean` + `check_run`: the save -> reload -> same outputs check of one version."""
    start = time.time()
    run = run_clean(export_dir, calls, multi=multi, timeout_s=timeout_s)
    summary = check_run(run, signature_fns, calls, multi, atol, where=export_dir)
    summary["seconds"] = time.time() - start
    return summary
