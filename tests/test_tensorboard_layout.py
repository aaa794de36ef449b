"""`python -m trainer.task` writes one clean TensorBoard layout: LOG_DIR/train with single tags
(batch_loss, epoch_loss, epoch_<task>_auc) and LOG_DIR/eval with the per-epoch eval scalars
(eval/gauc, eval/auc, eval/logloss), read back from the event files."""
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 2


def _scalars(folder):
    """tag -> {step: value} over every event file of `folder`."""
    import tensorflow as tf

    values = {}
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                          else value.simple_value)
                values.setdefault(value.tag, {})[event.step] = number
    return values


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tensorboard") / "model"
    # --log-every-steps larger than the run: no batch-level step is ever recorded, which is
    # exactly when the eval scalars used to be dropped (empty eval event file).
    run = subprocess.run(
        [sys.executable, "-m", "trainer.task", "--data", tiny_dataset, "--model-dir",
         str(model_dir), "--model", "dnn", "--epochs", str(EPOCHS), "--batch-size", "16",
         "--log-every-steps", "1000"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return str(model_dir)


def test_eval_scalars_land_in_the_eval_folder_with_the_summary_values(trained):
    from trainer import task

    logs = os.path.join(trained, task.LOG_SUBDIR)
    assert sorted(os.listdir(logs)) == ["eval", "train"]  # no validation/ duplicate
    eval_scalars = _scalars(os.path.join(logs, task.EVAL_LOG_SUBDIR))
    assert set(eval_scalars) == set(task.EVAL_SUMMARY_TAGS.values())
    summary = json.load(open(os.path.join(trained, task.SUMMARY_FILE)))
    for record in summary["history"]:
        for key, tag in task.EVAL_SUMMARY_TAGS.items():
            assert eval_scalars[tag][record["epoch"]] == pytest.approx(record[key], rel=1e-6)
    assert sorted(eval_scalars["eval/gauc"]) == list(range(1, EPOCHS + 1))


def test_train_tags_are_single_and_per_epoch(trained):
    from trainer import task

    train = _scalars(os.path.join(trained, task.LOG_SUBDIR, "train"))
    doubled = [t for t in train if t.startswith(("epoch_epoch", "epoch_batch", "batch_batch",
                                                 "batch_epoch", "epoch_regularization"))]
    assert not doubled, doubled
    assert "epoch_loss" in train and "epoch_click_auc" in train
    assert sorted(train["epoch_loss"]) == list(range(1, EPOCHS + 1))  # same steps as eval/
    assert all(tag.startswith(("epoch_", "batch_")) for tag in train)
    summary = json.load(open(os.path.join(trained, task.SUMMARY_FILE)))
    for epoch, loss in enumerate(summary["train_loss_this_run"], 1):
        assert train["epoch_loss"][epoch] == pytest.approx(loss, rel=1e-5)
