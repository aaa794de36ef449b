"""Progress lines for long steps, everything else in a log file.

`run_logged(command, log_path, watch)` runs a command with its whole output (stdout and stderr,
framework warnings included) appended to `log_path`; only the lines `watch` turns into text
reach the terminal, and when nothing was shown for `heartbeat_s` a "still running" line with the
elapsed time says the step is alive. With `verbose` every line also goes to the terminal.

`KfpStages` is a `watch` for `python -m pipelines.run_local`: kfp.local logs "Executing task
'x'" and "Task 'x' finished with status SUCCESS" around each step; they become counted lines
("[3/6] train ... done in 74s"), and a few lines of the steps themselves (Beam's stage lines,
per-epoch eval GAUC, the release gate's decision, the export's) are shown under them.
"""
from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, TextIO

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
KFP_STARTED = re.compile(r"Executing task '([^']+)'")
KFP_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
KFP_CONDITION_FALSE = re.compile(r"Skipping conditional task (\S+)")
# Lines of the steps worth showing under their stage (after KFP's indentation is stripped).
STEP_LINES = (
    re.compile(r"^\[\d+/\d+\] (?:checking|running|writing) "),  # python -m preprocessing
    re.compile(r" INFO (epoch \d+: eval .*)$"),  # python -m trainer.task
    re.compile(r" INFO (early stopping: .*)$"),
    re.compile(r"^(release gate vs .*)$"),  # python -m pipelines.release_gate
    re.compile(r"^\[export [0-9:]+\] (.*)$"),  # python -m serving.export
)
DEFAULT_HEARTBEAT_S = 30.0


def quiet_environment(environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a child whose output goes to a log file: TensorFlow's C++ INFO and
    WARNING lines off (TF_CPP_MIN_LOG_LEVEL=2) unless the caller chose a level, no Python
    warnings unless asked for, unbuffered output so progress lines arrive when written."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def elapsed(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m{seconds % 60:02d}s"


class KfpStages:
    """Turns kfp.local's log lines into counted stage lines; `stages` is the pipeline's step
    count (its executors)."""

    def __init__(self, stages: int, clock: Callable[[], float] = time.monotonic):
        self.stages = stages
        self.clock = clock
        self.started: Dict[str, float] = {}
        self.number: Dict[str, int] = {}
        self.status: Dict[str, str] = {}

    def __call__(self, line: str) -> Optional[str]:
        text = ANSI_ESCAPE.sub("", line).rstrip()
        match = KFP_STARTED.search(text)
        if match:
            name = match.group(1)
            self.number[name] = len(self.number) + 1
            self.started[name] = self.clock()
            return f"[{self.number[name]}/{self.stages}] {name} ..."
        match = KFP_FINISHED.search(text)
        if match:
            name, status = match.groups()
            self.status[name] = status
            took = elapsed(self.clock() - self.started.get(name, self.clock()))
            word = "done" if status == "SUCCESS" else status
            return f"[{self.number.get(name, '?')}/{self.stages}] {name} {word} in {took}"
        if KFP_CONDITION_FALSE.search(text):
            not_run = self.stages - len(self.number)
            return (f"[{len(self.number) + 1}/{self.stages}] not run ({not_run} step(s)): the "
                    "release gate did not bless the candidate")
        stripped = text.strip()
        for pattern in STEP_LINES:
            match = pattern.search(stripped)
            if match:
                return "      " + (match.group(1) if pattern.groups else stripped)
        return None


def run_logged(command: Sequence[str], log_path: str, watch: Callable[[str], Optional[str]],
               verbose: bool = False, heartbeat_s: float = DEFAULT_HEARTBEAT_S,
               label: str = "", env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
               out: TextIO = sys.stdout) -> int:
    """Runs `command`; every output line goes to `log_path`, what `watch` returns (and, with
    `verbose`, every line) to `out`, plus a heartbeat after `heartbeat_s` without a shown line.
    Returns the exit code."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    start = last_shown = time.monotonic()
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(list(command), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace",
                                   env=env, cwd=cwd)

        def pump():
            for raw in process.stdout:
                lines.put(raw)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while True:
            try:
                raw = lines.get(timeout=max(0.1, heartbeat_s - (time.monotonic() - last_shown)))
            except queue.Empty:
                raw = ""
            if time.monotonic() - last_shown >= heartbeat_s:  # silent, or only log lines
                out.write(f"      {label + ': ' if label else ''}still running "
                          f"({elapsed(time.monotonic() - start)})\n")
                out.flush()
                last_shown = time.monotonic()
            if raw is None:
                break
            if not raw:
                continue
            log.write(raw)
            log.flush()
            if verbose:
                out.write(raw if raw.endswith("\n") else raw + "\n")
            shown = watch(raw)
            if shown:
                out.write(shown + "\n")
                out.flush()
                last_shown = time.monotonic()
        return process.wait()


def tail(path: str, count: int = 40) -> List[str]:
    """The last `count` lines of a log file (what to show when a step failed)."""
    try:
        with open(path, errors="replace") as f:
            return f.readlines()[-count:]
    except OSError:
        return []
