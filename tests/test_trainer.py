"""trainer.task on the tiny dataset: the loss goes down, runs are reproducible with a seed,
outputs follow docs/ARCHITECTURE.md, bad input fails clearly, and a run killed with SIGKILL
after its first epoch resumes from that epoch when restarted with the same command."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(tiny_dataset, model_dir, *extra):
    from trainer import task

    args = task.build_parser().parse_args(
        ["--data", tiny_dataset, "--model-dir", str(model_dir), "--batch-size", "16",
         "--log-every-steps", "1000"] + list(extra))
    return task.train(args)


def test_training_loss_goes_down_and_outputs_are_written(tiny_dataset, tmp_path):
    import tensorflow as tf

    from trainer.config import ModelConfig
    from trainer.model import load_trained_model

    summary = _train(tiny_dataset, tmp_path / "m", "--model", "qin", "--epochs", "4",
                     "--learning-rate", "0.005", "--seed", "3")
    losses = summary["train_loss_this_run"]
    assert len(losses) == 4 and all(map(lambda x: x == x, losses))
    assert losses[-1] < losses[0] * 0.95, losses
    assert summary["epochs_completed"] == 4 and summary["global_step"] == 4 * 4
    assert summary["best_epoch"] in (1, 2, 3, 4)
    best = max(h["eval_gauc"] for h in summary["history"])
    assert summary["best_eval_gauc"] == pytest.approx(best)
    # ARCHITECTURE section 3 layout
    assert ModelConfig.load(str(tmp_path / "m")).seed == 3
    assert (tmp_path / "m" / "final" / "weights.index").exists()
    assert list((tmp_path / "m" / "checkpoints").iterdir())
    assert list((tmp_path / "m" / "logs").rglob("events.out.tfevents*"))
    model = load_trained_model(str(tmp_path / "m"), tiny_dataset)
    assert model is not None
    tf.keras.backend.clear_session()


def test_same_seed_same_run_and_other_seed_differs(tiny_dataset, tmp_path):
    import tensorflow as tf

    a = _train(tiny_dataset, tmp_path / "a", "--model", "dnn", "--epochs", "2", "--steps-per-epoch", "2",
               "--seed", "7")
    tf.keras.backend.clear_session()
    b = _train(tiny_dataset, tmp_path / "b", "--model", "dnn", "--epochs", "2", "--steps-per-epoch", "2",
               "--seed", "7")
    tf.keras.backend.clear_session()
    c = _train(tiny_dataset, tmp_path / "c", "--model", "dnn", "--epochs", "2", "--steps-per-epoch", "2",
               "--seed", "8")
    tf.keras.backend.clear_session()
    assert a["train_loss_this_run"] == pytest.approx(b["train_loss_this_run"], rel=1e-5)
    assert [h["eval_gauc"] for h in a["history"]] == pytest.approx(
        [h["eval_gauc"] for h in b["history"]], rel=1e-5)
    assert a["train_loss_this_run"] != pytest.approx(c["train_loss_this_run"], rel=1e-5)


def test_vertex_ai_environment_sets_default_directories(monkeypatch, tmp_path):
    from trainer import task

    monkeypatch.setenv("AIP_MODEL_DIR", str(tmp_path / "vm"))
    monkeypatch.setenv("AIP_CHECKPOINT_DIR", str(tmp_path / "vc"))
    monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", str(tmp_path / "vt"))
    dirs = task.resolve_dirs(task.build_parser().parse_args(["--data", "x"]))
    assert dirs == {"model_dir": str(tmp_path / "vm"), "checkpoint_dir": str(tmp_path / "vc"),
                    "log_dir": str(tmp_path / "vt")}
    explicit = task.resolve_dirs(task.build_parser().parse_args(
        ["--data", "x", "--model-dir", "m", "--log-dir", "l"]))
    assert explicit["model_dir"] == "m" and explicit["log_dir"] == "l"
    monkeypatch.delenv("AIP_MODEL_DIR")
    monkeypatch.delenv("AIP_CHECKPOINT_DIR")
    with pytest.raises(ValueError, match="--model-dir"):
        task.resolve_dirs(task.build_parser().parse_args(["--data", "x"]))


def test_bad_input_fails_with_a_clear_message(tiny_dataset, tmp_path):
    from trainer import task

    assert task.main(["--data", str(tmp_path / "nothing"), "--model-dir", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="unknown model preset"):
        _train(tiny_dataset, tmp_path / "m", "--model", "nope")
    with pytest.raises(ValueError, match="unknown model config keys"):
        _train(tiny_dataset, tmp_path / "m", "--model", "dnn", "--config", '{"k9": 1}')


def _command(tiny_dataset, model_dir):
    return [sys.executable, "-m", "trainer.task", "--data", tiny_dataset, "--model-dir",
            str(model_dir), "--model", "dnn", "--epochs", "3", "--steps-per-epoch", "150",
            "--batch-size", "8", "--log-every-steps", "50", "--eval-batches", "1"]


def test_killed_run_resumes_from_its_last_epoch(tiny_dataset, tmp_path):
    model_dir = tmp_path / "m"
    state = model_dir / "checkpoints" / "eval_state.json"
    log1 = open(tmp_path / "run1.log", "w")
    first = subprocess.Popen(_command(tiny_dataset, model_dir), cwd=ROOT, stdout=log1,
                             stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    epochs_done = 0
    try:
        while time.time() < deadline and first.poll() is None:
            if state.exists():
                epochs_done = len(json.loads(state.read_text())["history"])
                if epochs_done >= 1:
                    break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be killed"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        log1.close()
    assert first.returncode == -signal.SIGKILL
    assert epochs_done == 1, "the first run was not killed during its second epoch"
    assert not (model_dir / "training_summary.json").exists()

    second = subprocess.run(_command(tiny_dataset, model_dir), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from checkpoint: global step 150, continuing at epoch 2/3" in second.stdout
    assert "starting training from scratch" not in second.stdout
    summary = json.loads((model_dir / "training_summary.json").read_text())
    assert summary["global_step"] == 3 * 150  # not 150 + 3 * 150: no epoch retrained
    assert summary["resumed_from_step"] == 150
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert len(summary["train_loss_this_run"]) == 2
