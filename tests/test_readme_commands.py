"""The README's commands, run as written on a fresh checkout.

Every fenced block of README.md is either run here, command by command in the README's order
(each command's own output is the next one's input: the synthetic logs feed preprocessing,
whose output feeds training, export, the server and the client), or listed in
`NOT_RUN_HERE` with the reason. A new block that is neither fails the test, so the README
cannot grow a recipe nobody runs.

What the test changes, and only that:
* `.venv/bin/python` / `python` become this interpreter; the upper-case placeholders (RAW,
  OUT, M, E, R) become folders of a temporary working directory, where the relative paths
  (`raw`, `models`, `runs`) land too;
* optional `[...]` groups are left out;
* sizes and budgets are scaled down by flags appended after the README's own
  (`SCALE_DOWN`; argparse keeps the last value), so the recipe runs in minutes on 2 cores;
* the server's port 8500 becomes a free loopback port, in the server command and the client's
  --server alike; the server runs in the background until the client has been answered.
"""
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, free_port, subprocess_env

# Blocks that are not commands this machine can run, by a phrase of their first line.
NOT_RUN_HERE = {
    "make demo": "runs this test suite itself (`make test`) and the demo, which "
                 "tests/test_demo_output.py and the local pipeline test exercise",
    "common/": "the repository layout, not a command",
}

PLACEHOLDERS = {"RAW": "raw", "OUT": "out", "M": "model", "E": "evaluation", "R": "report"}

# Flags appended to a module's README command: the same recipe at test size.
SCALE_DOWN = {
    "preprocessing.synthetic": ["--users", "120", "--items", "400", "--requests", "700"],
    "preprocessing": ["--workers", "1", "--long-term-length", "100"],
    "trainer.task": ["--epochs", "1", "--batch-size", "32"],
    "trainer.report": ["--presets", "dnn", "--epochs", "1", "--batch-size", "32"],
    "pipelines.run_local": ["--users", "40", "--items", "400", "--requests", "500",
                            "--epochs", "1", "--batch-size", "32", "--preprocess-workers",
                            "1", "--long-term-length", "100", "--pdr-epochs", "1",
                            "--retrieval-max-requests", "200"],
}

LONG_RUNNING = {"serving.model_server"}


def readme_blocks(text):
    """The fenced blocks of a Markdown text, as lists of lines."""
    return [block.strip("\n").splitlines()
            for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)]


def readme_commands(block):
    """The command lines of a block: continuations joined, comments and [optional] groups
    removed, blank lines skipped."""
    joined = "\n".join(block).replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\s#\s.*$", "", line)
        line = " ".join(re.sub(r"\[[^\]]*\]", "", line).split())
        if line:
            commands.append(line)
    return commands


def module_of(argv):
    return argv[argv.index("-m") + 1] if "-m" in argv else None


def as_run_here(command, port):
    """The argv this test runs for a README command line (see the module docstring)."""
    argv = shlex.split(command)
    if argv[0] in (".venv/bin/python", "python", "python3"):
        argv[0] = sys.executable
    argv = [PLACEHOLDERS.get(arg, arg) for arg in argv]
    argv = [re.sub(r"^(RAW|OUT|M|E|R)/", lambda m: PLACEHOLDERS[m.group(1)] + "/", arg)
            for arg in argv]
    argv = [arg.replace("127.0.0.1:8500", f"127.0.0.1:{port}") for arg in argv]
    if module_of(argv) == "serving.model_server":
        argv = [str(port) if previous == "--port" else arg
                for previous, arg in zip([None] + argv, argv)]
    if "--help" not in argv:
        argv += SCALE_DOWN.get(module_of(argv), [])
    return argv


def test_readme_parsing_on_a_known_text():
    text = "intro\n```\npython -m a --x RAW [--y 5]   # note\n.venv/bin/python -m b \\\n" \
           "    --z OUT/f.sqlite\n```\n"
    (block,) = readme_blocks(text)
    assert readme_commands(block) == ["python -m a --x RAW",
                                      ".venv/bin/python -m b --z OUT/f.sqlite"]
    argv = as_run_here(readme_commands(block)[1], 9999)
    assert argv == [sys.executable, "-m", "b", "--z", "out/f.sqlite"]
    server = as_run_here("python -m serving.model_server --port 8500", 9999)
    assert server[-2:] == ["--port", "9999"]
    assert as_run_here("python -m trainer.task --epochs 5", 1)[-4:] == [
        "--epochs", "1", "--batch-size", "32"]


def _blocks_to_run():
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = readme_blocks(f.read())
    to_run, unclaimed = [], []
    for block in blocks:
        if any(phrase in block[0] for phrase in NOT_RUN_HERE):
            continue
        commands = readme_commands(block)
        if commands and all(shlex.split(c)[0] in (".venv/bin/python", "python", "python3")
                            for c in commands):
            to_run.append(commands)
        else:
            unclaimed.append(block[0])
    return to_run, unclaimed


def test_every_readme_block_is_run_or_excused():
    to_run, unclaimed = _blocks_to_run()
    assert not unclaimed, (f"README blocks neither run by this test nor listed in NOT_RUN_HERE: "
                           f"{unclaimed}")
    modules = {module_of(shlex.split(c)) for block in to_run for c in block}
    # The recipe the README teaches, end to end.
    assert {"preprocessing.synthetic", "preprocessing", "trainer.task", "trainer.evaluate",
            "trainer.report", "serving.export", "serving.model_server", "serving.client",
            "pipelines.compile", "pipelines.run_local"} <= modules


def _wait_for_port(port, proc, seconds):
    import socket

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    return False


@pytest.mark.timeout(1800)  # the whole README recipe at test size, on 2 cores
def test_readme_commands_run_as_written(tmp_path):
    to_run, _ = _blocks_to_run()
    port = free_port()
    env = subprocess_env()
    server = None
    ran = []
    try:
        for block in to_run:
            for command in block:
                argv = as_run_here(command, port)
                module = module_of(argv)
                if module in LONG_RUNNING:
                    log = open(tmp_path / "model_server.log", "w")
                    server = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log,
                                              stderr=subprocess.STDOUT)
                    # The port opens only once the initial model is AVAILABLE.
                    assert _wait_for_port(port, server, 300), (
                        f"README: `{command}` did not start serving:\n"
                        + (tmp_path / "model_server.log").read_text()[-3000:])
                    ran.append(module)
                    continue
                started = time.monotonic()
                proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True,
                                      text=True, timeout=1200)
                print(f"{time.monotonic() - started:6.1f}s  {command}")
                assert proc.returncode == 0, (
                    f"README: `{command}` failed (ran as {argv[1:]}):\n"
                    f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                ran.append((module, proc.stdout))
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()

    # What each step of the recipe leaves behind, where the README says it does.
    assert (tmp_path / "raw" / "requests.parquet").stat().st_size > 0
    assert list((tmp_path / "out" / "train").glob("*.tfrecord.gz"))
    assert (tmp_path / "out" / "feature_store.sqlite").exists()
    assert list((tmp_path / "model" / "final").iterdir())
    assert (tmp_path / "evaluation" / "metrics.json").exists()
    assert (tmp_path / "report" / "report.md").exists()
    assert (tmp_path / "models" / "qin" / "1" / "saved_model.pb").exists()
    assert (tmp_path / "pipelines" / "qin_pipeline.yaml").exists()
    assert list((tmp_path / "runs").iterdir())
    client_output = [out for step in ran if isinstance(step, tuple)
                     for module, out in [step] if module == "serving.client"]
    assert client_output, "the README's client command was not run"
    # The README's example user exists in the README's own synthetic command's data, so the
    # list is personalized, not the unknown-user fallback.
    assert "u007" in client_output[0] and "unknown user" not in client_output[0].lower()
    assert re.search(r"^\s*1[.)\s]", client_output[0], flags=re.M), client_output[0][-2000:]
