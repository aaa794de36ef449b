"""Runs the QIN pipeline on this machine through `kfp.local`, with no pip install per step and
no network: every step runs in a subprocess of the current Python environment, which already
has the project (KFP's SubprocessRunner with use_venv=False, components with
install_kfp_package=False). Conditions (the evaluation gate) work locally since KFP 2.16.

    python -m pipelines.run_local --pipeline-root runs/ --model-base-path models/ --users 100

Every pipeline parameter is a flag (see --help); artifacts land under --pipeline-root.
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TYPES = {"String": str, "Integer": int, "Float": float, "Boolean": bool}


def _parser(pipeline) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.run_local", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline-root", default="pipeline_runs",
                        help="directory for the run's artifacts (default: pipeline_runs)")
    for name, spec in pipeline.component_spec.inputs.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=_TYPES[spec.type],
                            default=spec.default,
                            help=f"pipeline parameter {name} (default: {spec.default!r})")
    return parser


def list_artifacts(run_dir: str) -> Dict[str, List[str]]:
    """Task name -> the artifact paths it wrote (executor_output.json files excluded)."""
    out: Dict[str, List[str]] = {}
    for task in sorted(os.listdir(run_dir)):
        task_dir = os.path.join(run_dir, task)
        if os.path.isdir(task_dir):
            out[task] = sorted(os.path.join(task_dir, p) for p in os.listdir(task_dir)
                               if p != "executor_output.json")
    return out


def run(arguments: Dict, pipeline_root: str) -> str:
    """Runs the pipeline locally and returns the run directory under pipeline_root."""
    from kfp import local

    from pipelines.pipeline import qin_pipeline

    pipeline_root = os.path.abspath(pipeline_root)
    os.makedirs(pipeline_root, exist_ok=True)
    # Steps run as subprocesses: they find the project through PYTHONPATH and the legacy-Keras
    # switch through the environment (TensorFlow is imported before project code there).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    arguments = dict(arguments)
    for key in ("model_base_path",) + (("input_uri",) if arguments.get("input_uri") else ()):
        if arguments.get(key) and "://" not in arguments[key]:
            arguments[key] = os.path.abspath(arguments[key])
    before = set(os.listdir(pipeline_root))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root,
               raise_on_error=True)
    qin_pipeline(**arguments)
    new = sorted(set(os.listdir(pipeline_root)) - before)
    if not new:
        raise RuntimeError(f"the pipeline wrote no run directory under {pipeline_root}")
    return os.path.join(pipeline_root, new[-1])


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    from pipelines.pipeline import qin_pipeline

    warnings.filterwarnings("ignore", category=FutureWarning)
    args = vars(_parser(qin_pipeline).parse_args(argv))
    pipeline_root = args.pop("pipeline_root")
    start = time.time()
    run_dir = run(args, pipeline_root)
    print(f"\npipeline finished in {time.time() - start:.0f}s; artifacts in {run_dir}")
    print(json.dumps(list_artifacts(run_dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
