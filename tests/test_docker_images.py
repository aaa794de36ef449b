"""The container images each runner needs, checked without a Docker engine by parsing the
Dockerfiles: the pipeline's CPU image (root Dockerfile), the GPU training image and the Dataflow
worker image pin the TensorFlow, Beam and Python versions of requirements.txt and setup.py, and
the worker image keeps the Beam SDK's boot entrypoint that starts the worker harness."""
import json
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_IMAGE = "Dockerfile"
TRAINER_IMAGE = os.path.join("dockerfiles", "trainer.Dockerfile")
BEAM_WORKER_IMAGE = os.path.join("dockerfiles", "beam_worker.Dockerfile")
BEAM_BOOT = "/opt/apache/beam/boot"
PROJECT_PACKAGES = ("common", "preprocessing", "trainer", "serving", "pipelines")


def dockerfile_instructions(relative_path):
    with open(os.path.join(REPO, relative_path)) as f:
        return parse_dockerfile(f.read())


def parse_dockerfile(text):
    """[(INSTRUCTION, arguments)] with comments dropped and continuation lines joined."""
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    out = []
    for line in logical:
        instruction, _, arguments = line.strip().partition(" ")
        out.append((instruction.upper(), arguments.strip()))
    return out


def arguments_of(instructions, name):
    return [arguments for instruction, arguments in instructions if instruction == name]


def build_args(instructions):
    return dict(a.split("=", 1) for a in arguments_of(instructions, "ARG") if "=" in a)


def requirement_pins():
    """package name (extras dropped) -> version spec of requirements.txt, e.g. '2.20.*'."""
    pins = {}
    with open(os.path.join(REPO, "requirements.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)$", line)
            if match:
                pins[match.group(1).lower()] = match.group(3)
    return pins


def supported_python():
    """'3.11' from setup.py's python_requires '>=3.11,<3.12' (one minor version)."""
    with open(os.path.join(REPO, "setup.py")) as f:
        match = re.search(r'python_requires=">=(\d+)\.(\d+),<(\d+)\.(\d+)"', f.read())
    major, minor, below_major, below_minor = map(int, match.groups())
    assert (below_major, below_minor) == (major, minor + 1), "images pin one Python version"
    return f"{major}.{minor}"


def matches_pin(version, pin):
    """An exact image version against a requirements spec ('2.20.0' against '2.20.*')."""
    if pin.endswith(".*"):
        return version.startswith(pin[:-1])
    return version == pin


def base_image(instructions):
    (base,) = arguments_of(instructions, "FROM")  # single-stage images
    return base


def installs_requirements(instructions):
    copied = any(re.match(r"^requirements\.txt\s", a) for a in arguments_of(instructions, "COPY"))
    installed = any(re.search(r"pip install .*-r requirements\.txt", a)
                    for a in arguments_of(instructions, "RUN"))
    return copied and installed


def copied_packages(instructions):
    return {a.split()[0].rstrip("/") for a in arguments_of(instructions, "COPY")}


def test_no_top_level_folder_hides_an_installed_package():
    # The repository root is on the import path of every step: a `docker/` folder there would
    # be imported as the Docker SDK that kfp.local looks for, and break local pipeline runs.
    for name in ("docker", "kfp", "tensorflow", "apache_beam"):
        assert not os.path.isdir(os.path.join(REPO, name)), f"rename the {name}/ folder"


def test_matches_pin_reads_requirement_specs():
    assert matches_pin("2.20.0", "2.20.*") and matches_pin("2.20.3", "2.20.*")
    assert not matches_pin("2.2.0", "2.20.*") and not matches_pin("2.21.0", "2.20.*")
    assert matches_pin("0.7.7", "0.7.7") and not matches_pin("0.7.8", "0.7.7")


def test_requirements_pin_the_versions_the_images_are_built_for():
    pins = requirement_pins()
    assert {"tensorflow", "tf-keras", "apache-beam"} <= set(pins), pins
    assert re.fullmatch(r"\d+\.\d+", supported_python())


def test_the_cpu_pipeline_image_has_the_supported_python_and_the_pinned_stack():
    instructions = dockerfile_instructions(CPU_IMAGE)
    assert base_image(instructions) == f"python:{supported_python()}-slim"
    assert installs_requirements(instructions)
    assert set(PROJECT_PACKAGES) <= copied_packages(instructions)


def test_the_training_image_is_tensorflow_gpu_at_the_pinned_version():
    instructions = dockerfile_instructions(TRAINER_IMAGE)
    match = re.fullmatch(r"tensorflow/tensorflow:(\d+\.\d+\.\d+)-gpu", base_image(instructions))
    assert match, f"not a TensorFlow GPU image with an exact version: {base_image(instructions)}"
    assert matches_pin(match.group(1), requirement_pins()["tensorflow"]), match.group(1)
    assert installs_requirements(instructions)
    assert set(PROJECT_PACKAGES) <= copied_packages(instructions)
    # TensorFlow's image chooses its Python: the build checks it is the supported one, and that
    # the requirements left the CUDA build of TensorFlow in place.
    assert build_args(instructions)["PYTHON_VERSION"] == supported_python()
    runs = arguments_of(instructions, "RUN")
    assert any("sys.version_info" in run and "${PYTHON_VERSION}" in run for run in runs)
    assert any("is_built_with_cuda" in run for run in runs)


def test_the_dataflow_worker_image_is_beams_sdk_image_at_the_pinned_versions():
    instructions = dockerfile_instructions(BEAM_WORKER_IMAGE)
    match = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\d+\.\d+\.\d+)",
                         base_image(instructions))
    assert match, f"not a Beam Python SDK image with an exact version: {base_image(instructions)}"
    python, beam = match.groups()
    assert python == supported_python()
    assert matches_pin(beam, requirement_pins()["apache-beam"]), beam
    assert installs_requirements(instructions)
    assert {"common", "preprocessing", "setup.py"} <= copied_packages(instructions)
    assert any(re.search(r"pip install .*--no-deps \.$", a)
               for a in arguments_of(instructions, "RUN"))


def test_the_dataflow_worker_image_keeps_beams_boot_entrypoint():
    instructions = dockerfile_instructions(BEAM_WORKER_IMAGE)
    entrypoints = arguments_of(instructions, "ENTRYPOINT")
    # Inherited from the SDK image when absent; when set, the last one wins and must be boot.
    if entrypoints:
        assert json.loads(entrypoints[-1]) == [BEAM_BOOT]
    assert not arguments_of(instructions, "CMD"), "the runner passes the harness arguments"


@pytest.mark.parametrize("text,expected", [
    ('FROM x\nENTRYPOINT ["/bin/sh"]\n', [("FROM", "x"), ("ENTRYPOINT", '["/bin/sh"]')]),
    ("# c\nRUN a \\\n  && b\n", [("RUN", "a    && b")]),
])
def test_the_dockerfile_reader_joins_lines_and_drops_comments(text, expected):
    assert parse_dockerfile(text) == expected
