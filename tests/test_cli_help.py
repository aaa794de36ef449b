"""Every command-line entry point answers `--help` at once: exit code 0, a usage line naming the
command the way it is run (`python -m trainer.task`, not `task.py`), option help, and no
TensorFlow import (which alone takes seconds). Imports are traced with `python -X importtime`,
so a module that imports TensorFlow at the top, directly or through another module, shows."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("trainer.task", "trainer.evaluate", "trainer.report", "serving.export",
            "serving.client", "preprocessing", "pipelines.compile", "pipelines.run_local",
            "pipelines.demo")
HEAVY_MODULES = ("tensorflow", "tf_keras", "tensorflow_recommenders", "scann")


def imported_modules(importtime_log):
    """Names of the modules an `-X importtime` log shows as imported."""
    return set(re.findall(r"^import time:\s+\d+\s+\|\s+\d+\s+\|\s+(\S+)\s*$", importtime_log,
                          re.M))


def test_imported_modules_reads_the_importtime_log():
    log = ("import time: self [us] | cumulative | imported package\n"
           "import time:       163 |        163 | __future__\n"
           "import time:      4754 |    2589110 | tensorflow\n"
           "import time:       265 |        710 |     tf_keras.api._v2.keras\n")
    assert imported_modules(log) == {"__future__", "tensorflow", "tf_keras.api._v2.keras"}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_answers_without_importing_tensorflow(command):
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", command, "--help"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: python -m {command} "), proc.stdout[:200]
    assert "options:" in proc.stdout and "-h, --help" in proc.stdout
    assert "(default: None)" not in proc.stdout
    modules = imported_modules(proc.stderr)
    assert "argparse" in modules and "common" in modules  # the trace covers the entry point
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY_MODULES)
    assert not heavy, f"`{command} --help` imported {heavy[:5]}"
