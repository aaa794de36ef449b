"""Packages the project for remote workers (Dataflow: `--setup_file ./setup.py`) and images.

Local use needs no install: `make demo` / `make test` run from the checkout.
"""
import setuptools

setuptools.setup(
    name="qin-search-ranking",
    version="0.1.0",
    description="QIN personalized search ranking: Beam preprocessing, tf-keras model, "
                "TF Serving-protocol serving, Kubeflow pipeline",
    packages=setuptools.find_packages(include=["common", "common.*", "preprocessing",
                                               "preprocessing.*", "trainer", "trainer.*",
                                               "serving", "serving.*", "pipelines",
                                               "pipelines.*"]),
    python_requires=">=3.11,<3.12",
)
