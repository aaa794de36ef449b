"""Compiles the QIN pipeline to the IR YAML that Vertex AI Pipelines and Kubeflow run.

    python -m pipelines.compile --output pipelines/qin_pipeline.yaml

The container images are read from the environment when the pipeline is imported:
QIN_PIPELINE_IMAGE (every step but training; the root Dockerfile) and QIN_TRAINER_IMAGE (the
GPU train step; dockerfiles/trainer.Dockerfile). KFP is imported only after the arguments are
parsed, so `--help` answers at once.
"""
import argparse
import sys

DEFAULT_OUTPUT = "pipelines/qin_pipeline.yaml"


def compile_pipeline(output: str) -> str:
    import os

    from kfp import compiler

    from pipelines.pipeline import qin_pipeline

    # Run from anywhere: the README's `--output pipelines/qin_pipeline.yaml` outside a checkout
    # creates the folder instead of failing after KFP has compiled.
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    compiler.Compiler().compile(pipeline_func=qin_pipeline, package_path=output)
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.compile",
        description="Write the pipeline YAML for Vertex AI Pipelines / Kubeflow. Container "
                    "images come from the environment: QIN_PIPELINE_IMAGE for every step but "
                    "training (default qin-search:latest, built from the root Dockerfile) and "
                    "QIN_TRAINER_IMAGE for the GPU train step (default qin-search-trainer:latest, "
                    "built from dockerfiles/trainer.Dockerfile).")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"where to write the YAML (default: {DEFAULT_OUTPUT})")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(compile_pipeline(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
