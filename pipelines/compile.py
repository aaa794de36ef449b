"""Compiles the QIN pipeline to the IR YAML that Vertex AI Pipelines and Kubeflow run.

    python -m pipelines.compile --output pipelines/qin_pipeline.yaml
"""
import argparse
import sys

from kfp import compiler

from pipelines.pipeline import qin_pipeline

DEFAULT_OUTPUT = "pipelines/qin_pipeline.yaml"


def compile_pipeline(output: str) -> str:
    compiler.Compiler().compile(pipeline_func=qin_pipeline, package_path=output)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the pipeline YAML for Vertex AI Pipelines / Kubeflow. The container "
                    "image comes from the QIN_PIPELINE_IMAGE environment variable "
                    "(default qin-search:latest).")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help=f"where to write the YAML (default {DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    print(compile_pipeline(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
