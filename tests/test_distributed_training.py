"""Distributed training on CPU: MirroredStrategy over 2 logical CPU devices, and
MultiWorkerMirroredStrategy as two local processes with TF_CONFIG on 127.0.0.1 free ports."""
import json
import math
import os
import subprocess
import sys

from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _base(tiny_dataset, model_dir, model, *extra):
    return [sys.executable, "-m", "trainer.task", "--data", tiny_dataset, "--model-dir",
            str(model_dir), "--model", model, "--epochs", "2", "--steps-per-epoch", "3",
            "--batch-size", "8", "--log-every-steps", "2"] + list(extra)


def test_mirrored_two_cpu_replicas(tiny_dataset, tmp_path):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    run = subprocess.run(_base(tiny_dataset, tmp_path / "m", "qin", "--strategy", "mirrored",
                               "--cpu-replicas", "2"),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "strategy: MirroredStrategy over 2 devices" in run.stdout
    summary = json.loads((tmp_path / "m" / "training_summary.json").read_text())
    assert summary["replicas"] == 2 and summary["strategy"] == "MirroredStrategy"
    assert summary["global_step"] == 6
    assert all(math.isfinite(x) for x in summary["train_loss_this_run"])
    assert all(math.isfinite(h["eval_gauc"]) for h in summary["history"])
    assert (tmp_path / "m" / "final" / "weights.index").exists()


def test_multi_worker_two_local_processes(tiny_dataset, tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes, logs = [], []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps({"cluster": cluster,
                                       "task": {"type": "worker", "index": index}})
        log = open(tmp_path / f"worker{index}.log", "w+")
        logs.append(log)
        processes.append(subprocess.Popen(_base(tiny_dataset, tmp_path / "m", "dnn"), cwd=ROOT,
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=170) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert codes == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    for out in outputs:
        assert "strategy: MultiWorkerMirroredStrategy (TF_CONFIG: 2 tasks" in out
        assert "done: 2 epochs" in out
    summary = json.loads((tmp_path / "m" / "training_summary.json").read_text())
    assert summary["strategy"] == "MultiWorkerMirroredStrategy" and summary["replicas"] == 2
    assert summary["global_step"] == 6
    assert all(math.isfinite(x) for x in summary["train_loss_this_run"])
    # only the chief (worker 0) writes the model outputs
    assert (tmp_path / "m" / "final" / "weights.index").exists()
    assert (tmp_path / "m" / "model_config.json").exists()
