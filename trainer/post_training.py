"""What is fitted after training, on the eval split, and travels with the model.

`M/post_training.json` (written by `python -m trainer.objectives`) holds

    {"calibration": {"<task>": {"method": "isotonic" | "platt", "x": [...], "y": [...]}},
     "fusion": {"weights": {"<task>": w}, "objective": "...", "formula": "product"}}

`trainer.model.load_trained_model` applies it: the knots go into the model's
`CalibrationLayer` variables and the weights replace the fused score's, so evaluation, the
exported SavedModel and every serving signature use the calibrated heads and the tuned score.
A model directory without the file serves the raw heads and the config's score weights.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from trainer.calibration import Knots

POST_TRAINING_FILE = "post_training.json"


def path(model_dir: str) -> str:
    return os.path.join(model_dir, POST_TRAINING_FILE)


def load(model_dir: str) -> Optional[Dict[str, Any]]:
    """The parsed file, or None when the model has not been post-trained."""
    import tensorflow as tf

    if not tf.io.gfile.exists(path(model_dir)):
        return None
    with tf.io.gfile.GFile(path(model_dir)) as f:
        return json.load(f)


def save(model_dir: str, calibration: Dict[str, Knots], fusion: Dict[str, Any]) -> str:
    import tensorflow as tf

    content = {"calibration": {t: k.to_dict() for t, k in calibration.items()},
               "fusion": fusion}
    with tf.io.gfile.GFile(path(model_dir), "w") as f:
        f.write(json.dumps(content, indent=2, sort_keys=True))
    return path(model_dir)


def apply_content(model, content: Optional[Dict[str, Any]]) -> None:
    """Sets the model's calibration maps and fusion weights from a post-training dict."""
    if not content:
        return
    for task, raw in content.get("calibration", {}).items():
        if task not in model.tasks:
            raise ValueError(f"post-training calibrates task {task!r}, which the model lacks "
                             f"(tasks {model.tasks})")
        model.calibration.assign(task, Knots.from_dict(raw))
    weights = content.get("fusion", {}).get("weights")
    if weights:
        model.set_score_weights(weights)


def apply(model, model_dir: str) -> None:
    """Applies `model_dir/post_training.json` to `model` when it exists."""
    apply_content(model, load(model_dir))
