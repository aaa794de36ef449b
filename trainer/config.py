"""Model configuration: one dataclass, named presets for QIN, its ablations and the baselines.

`preset(name)` returns a `ModelConfig`; `ModelConfig.override(json_or_path)` applies the
trainer's `--config` on top of it. The config round-trips through `model_config.json`, which
`trainer.model.load_trained_model` reads back to rebuild the exact architecture.

Model types (what the long-term and real-time parts are; the embeddings, the request/candidate
towers and the MMOE head are shared by all of them):

* ``qin``      RSU (stage 1 by query relevance, stage 2 by target relevance, both cosine between
               frozen pretrained content embeddings) -> FAU; real-time unit (self-attention +
               target attention). Ablation switches: ``use_stage1``, ``use_stage2``,
               ``use_engagement_weighting``, ``attention_fields``.
* ``dnn``      no behaviour sequences at all (request + candidate features only).
* ``din``      DIN activation-unit target attention over the real-time behaviours; no long-term
               sequence. DIN replaces the real-time unit (it *is* the baseline's sequence model).
* ``sim_hard`` SIM hard search: GSU keeps the K2 most recent long-term behaviours sharing the
               target's category (``sim_category_level``), ESU = multi-head target attention.
* ``sim_soft`` SIM soft search: GSU keeps the top-K2 long-term behaviours by inner product of
               learned embeddings, ESU = multi-head target attention.
* ``twin``     TWIN: GSU and ESU share one relevance alpha (inherent-feature attention plus a
               cross-feature bias), GSU keeps the top-K2, ESU is a softmax over them, 4 heads.

``sim_hard``, ``sim_soft`` and ``twin`` keep K2 behaviours per candidate (the size of the
``rsu_selected_*`` outputs) and use the same real-time unit as QIN.

Ranking score (``score_formula``):

* ``"product"`` (default): ``score = prod_t p_t ** w_t``; weights from ``score_weights``.
* ``"sum"``: ``score = sum_t w_t * p_t``.

When ``score_weights`` is empty the first task gets weight 1, every other binary task 0.5 and
the watch-time task 0 (the untuned score ranks as before; `python -m trainer.objectives` tunes
the weights on eval for a stated objective and stores them with the model).

Watch time (``watch_time_loss``, data whose tasks include ``watch_time``): the head predicts
the expected play time per impression E[T] in seconds, learned by

* ``"poisson"`` (default): E[T] = s * exp(logit), Poisson deviance on T / s over every
  candidate; its minimiser is the conditional mean, zero play times included;
* ``"weighted_logistic"``: YouTube's weighted logistic regression (Covington et al., RecSys
  2016): played candidates are positives weighted by T / s, the others negatives of weight 1;
  the odds then estimate E[T / s] / P(T = 0), so E[T] = s * exp(logit) * (1 - p_click).

s = ``watch_time_scale_s`` keeps the watch-time loss on the scale of the binary ones.

Position bias (``position_bias``, default on; PAL, Guo et al. RecSys 2019, and the "shallow
tower" of Zhao et al., "Recommending What Video to Watch Next", RecSys 2019): when the data
keeps the order candidates were shown in (metadata.json ``display_order``), training adds to
every task's logit a learned bias of the candidate's display position, clipped to
``position_buckets - 1`` (bias(p) = b[min(p, buckets - 1)] - b[0], so position 0 has none). The
model's outputs, evaluation, calibration and every serving signature score without it, i.e. at
position 0: servers rank before any position exists, and a term that is the same for every
candidate of a request could not change the ranking anyway. Data without display order, or
``position_bias: false``, builds no position weights (the model is exactly the one without the
term); a model_config.json saved before the option existed loads with it off.

Interest intensity (``interest_intensity_units``, QIN only, default U = 8; 0 = off): beside
the FAU's renormalised interest vector, unnormalised pools over the stage-2 behaviours weighted
by their target relevance (mass, filled share, U learned engagement directions), so how much of
the history lies near the target reaches the head (`trainer.layers.fused_attention`). Measured
on generated data (docs/REPORT.md, "Personalization mechanism"): +0.53 ± 0.16 test click GAUC
points over 3 seeds, paired, every seed positive. A model_config.json saved before the option
existed loads with 0.

Interest centroids (``interest_centroid_units``, QIN only, default 0 = off): for every
candidate, U learned engagement-weighted centroids of the stage-1 behaviours of its coarsest
category and the candidate's cosine to each (`trainer.layers.interest_centroids`), the learned
counterpart of the classical baseline's strongest feature. Measured on generated data
(docs/REPORT.md, "Where the gap to the GBDT is"): +0.13 ± 0.18 test click GAUC points at U = 4
over 3 seeds, paired (+0.21, +0.26, -0.08), so it stays off.

Item duration (``use_item_duration``, default on): when the item log gives video durations
(metadata.json ``item_durations``), every candidate's duration is looked up in a frozen table
inside the model (like the content embeddings: no serving input changes) and fed to the MMoE
as log-duration features. Watch time scales with a video's length and is otherwise
independent of relevance, so a model without it can learn length only per item id, and not at
all for items the logs rarely showed. A model_config.json saved before the option existed
loads with it off.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional

MODEL_CONFIG_FILE = "model_config.json"
MODEL_TYPES = ("qin", "dnn", "din", "sim_hard", "sim_soft", "twin")
ATTENTION_FIELDS = ("both", "id")
SCORE_FORMULAS = ("product", "sum")
WATCH_TIME_LOSSES = ("poisson", "weighted_logistic")
LONG_TERM_MODEL_TYPES = ("qin", "sim_hard", "sim_soft", "twin")


@dataclasses.dataclass
class ModelConfig:
    """Everything that defines a ranking model's architecture and loss (not the optimiser)."""

    model_type: str = "qin"
    # ---- RSU / QIN ablation switches ----
    use_stage1: bool = True  # False: stage 2 ranks every valid long-term behaviour
    use_stage2: bool = True  # False: the FAU attends over all K1 stage-1 behaviours
    use_engagement_weighting: bool = True  # False: g(i) = 1 and the fusion gate is a constant
    attention_fields: str = "both"  # "id": FAU attention from the ID field only (lambda = 1)
    # stage-1 behaviours kept per request; None: taken from the data (`resolved_for`)
    k1: Optional[int] = None
    k2: int = 20  # stage-2 behaviours kept per candidate (also the GSU size of SIM/TWIN)
    relevance_threshold: Optional[float] = None  # eps: stage-1 cosine below it is masked out
    fusion_lambda: Optional[float] = None  # None: learned; else fixed weight of the ID attention
    # FAU interest intensity: unnormalised relevance-weighted pools beside u_long
    # (trainer.layers.fused_attention); 0 leaves them out
    interest_intensity_units: int = 8
    # engaged-interest centroids of the candidate's category among the stage-1 behaviours
    # (trainer.layers.interest_centroids); 0 leaves them out
    interest_centroid_units: int = 0
    # ---- SIM / TWIN ----
    sim_category_level: int = -1  # category level matched by SIM hard search (-1 = finest)
    # ---- sizes ----
    id_embedding_dim: int = 16
    hidden_units: int = 64  # width of attention values / interest vectors
    attention_units: int = 32  # query/key width of the attentions
    num_heads: int = 4  # real-time self-attention, SIM ESU and TWIN heads
    use_real_time: bool = True  # real-time unit (or DIN) over the rt_* sequence
    num_experts: int = 4
    expert_units: List[int] = dataclasses.field(default_factory=lambda: [64])
    tower_units: List[int] = dataclasses.field(default_factory=lambda: [32])
    dropout: float = 0.0
    l2_regularization: float = 0.0  # on the trainable embedding tables
    # ---- multi-task loss and score ----
    task_loss_weights: Dict[str, float] = dataclasses.field(default_factory=dict)  # default 1.0
    score_formula: str = "product"
    score_weights: Dict[str, float] = dataclasses.field(default_factory=dict)
    watch_time_loss: str = "poisson"  # see the module docstring
    watch_time_scale_s: float = 10.0  # seconds: the unit of the watch-time loss
    # ---- position bias (see the module docstring) ----
    position_bias: bool = True  # used only when the data keeps the display order
    position_buckets: int = 20  # positions 0 .. buckets - 2 each, the rest share the last
    # ---- item side features (see the module docstring) ----
    use_item_duration: bool = True  # used only when the data gives item durations
    seed: int = 0

    # ---- validation --------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        def fail(message):
            raise ValueError(f"invalid model config: {message}")

        if self.model_type not in MODEL_TYPES:
            fail(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        if self.attention_fields not in ATTENTION_FIELDS:
            fail(f"attention_fields {self.attention_fields!r} is not one of {ATTENTION_FIELDS}")
        if self.score_formula not in SCORE_FORMULAS:
            fail(f"score_formula {self.score_formula!r} is not one of {SCORE_FORMULAS}")
        if self.watch_time_loss not in WATCH_TIME_LOSSES:
            fail(f"watch_time_loss {self.watch_time_loss!r} is not one of {WATCH_TIME_LOSSES}")
        if not self.watch_time_scale_s > 0:
            fail(f"watch_time_scale_s must be > 0 (got {self.watch_time_scale_s})")
        if not isinstance(self.interest_intensity_units, int) or self.interest_intensity_units < 0:
            fail(f"interest_intensity_units must be an integer >= 0 "
                 f"(got {self.interest_intensity_units!r})")
        if (not isinstance(self.interest_centroid_units, int)
                or self.interest_centroid_units < 0):
            fail(f"interest_centroid_units must be an integer >= 0 "
                 f"(got {self.interest_centroid_units!r})")
        if (self.k1 is not None and self.k1 < 1) or self.k2 < 1:
            fail(f"k1 and k2 must be >= 1 (got k1={self.k1}, k2={self.k2})")
        if self.k1 is not None and self.k2 > self.k1:
            fail(f"k2={self.k2} exceeds k1={self.k1}: stage 2 selects among stage-1 behaviours")
        if self.fusion_lambda is not None and not 0.0 <= self.fusion_lambda <= 1.0:
            fail(f"fusion_lambda must be in [0, 1] or null (got {self.fusion_lambda})")
        if self.relevance_threshold is not None and not -1.0 <= self.relevance_threshold <= 1.0:
            fail(f"relevance_threshold is a cosine, must be in [-1, 1] "
                 f"(got {self.relevance_threshold})")
        for name in ("id_embedding_dim", "hidden_units", "attention_units", "num_heads",
                     "num_experts"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.attention_units % self.num_heads or self.hidden_units % self.num_heads:
            fail(f"attention_units ({self.attention_units}) and hidden_units "
                 f"({self.hidden_units}) must be divisible by num_heads ({self.num_heads})")
        if not isinstance(self.position_bias, bool):
            fail(f"position_bias must be true or false (got {self.position_bias!r})")
        if not isinstance(self.use_item_duration, bool):
            fail(f"use_item_duration must be true or false (got {self.use_item_duration!r})")
        if self.position_buckets < 2:
            fail(f"position_buckets must be >= 2 (got {self.position_buckets})")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1) (got {self.dropout})")
        for name in ("task_loss_weights", "score_weights"):
            for task, weight in getattr(self, name).items():
                if not isinstance(weight, (int, float)) or weight < 0:
                    fail(f"{name}[{task!r}] must be a non-negative number (got {weight!r})")
        return self

    def resolved_for(self, metadata) -> "ModelConfig":
        """This config with the settings the data fixes filled in, or a clear refusal.

        K1 and the relevance threshold belong to the data when its long-term sequences are RSU
        stage-1 selections (`long_term_mode == "stage1"`: preprocessing's --stage1-k and
        --stage1-threshold, recorded in metadata.json): the model then takes them from the
        metadata, and a config that sets different values is refused (a smaller K1 would keep
        the most *recent* of the stage-1 set, not the most relevant). Otherwise K1 defaults to
        common.features.DEFAULT_STAGE1_K.
        """
        from common import features as F

        resolved = dataclasses.replace(self)
        if metadata.long_term_mode == "stage1":
            for name, data_name, data_value in (
                    ("k1", "stage1_k", metadata.stage1_k),
                    ("relevance_threshold", "stage1_threshold", metadata.stage1_threshold)):
                mine = getattr(self, name)
                if mine is not None and mine != data_value:
                    raise ValueError(
                        f"model config sets {name}={mine}, but the data's long-term sequences "
                        f"are RSU stage-1 selections made with {data_name}={data_value} "
                        f"(metadata.json, preprocessing --{data_name.replace('_', '-')}): drop "
                        f"{name} from the config to take the data's value, or preprocess again "
                        f"with --{data_name.replace('_', '-')} {mine}")
            resolved.k1 = metadata.stage1_k
            resolved.relevance_threshold = metadata.stage1_threshold
        elif resolved.k1 is None:
            resolved.k1 = F.DEFAULT_STAGE1_K
        return resolved.validate()

    def check_tasks(self, tasks) -> None:
        """Fails fast when loss or score weights name a task the dataset does not have."""
        for name in ("task_loss_weights", "score_weights"):
            unknown = sorted(set(getattr(self, name)) - set(tasks))
            if unknown:
                raise ValueError(f"{name} names tasks {unknown} that the dataset does not have; "
                                 f"its tasks are {list(tasks)}")

    def loss_weight(self, task: str) -> float:
        return float(self.task_loss_weights.get(task, 1.0))

    def score_weight_map(self, tasks) -> Dict[str, float]:
        """Weights of the fused ranking score per task (see the module docstring)."""
        from common import features as F

        if self.score_weights:
            return {t: float(self.score_weights.get(t, 0.0)) for t in tasks}
        return {t: (1.0 if i == 0 else 0.5 if F.is_binary_task(t) else 0.0)
                for i, t in enumerate(tasks)}

    @property
    def uses_long_term(self) -> bool:
        return self.model_type in LONG_TERM_MODEL_TYPES

    @property
    def uses_real_time(self) -> bool:
        return self.use_real_time and self.model_type != "dnn"

    # ---- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**raw).validate()

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(_parse_json_object(text, "model config"))

    def override(self, json_or_path: Optional[str]) -> "ModelConfig":
        """A copy with the fields of a JSON object (string, or path to a .json file) replaced."""
        if not json_or_path:
            return self
        raw = read_overrides(json_or_path)
        merged = self.to_dict()
        known = set(merged)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        merged.update(raw)
        return ModelConfig(**merged).validate()

    def save(self, directory: str) -> str:
        import tensorflow as tf

        tf.io.gfile.makedirs(directory)
        path = os.path.join(directory, MODEL_CONFIG_FILE)
        with tf.io.gfile.GFile(path, "w") as f:
            f.write(self.to_json())
        return path

    @classmethod
    def load(cls, directory_or_file: str) -> "ModelConfig":
        import tensorflow as tf

        path = directory_or_file
        if not path.endswith(".json"):
            path = os.path.join(directory_or_file, MODEL_CONFIG_FILE)
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"{path} not found: is this a model directory written by "
                                    f"`python -m trainer.task`?")
        with tf.io.gfile.GFile(path) as f:
            raw = _parse_json_object(f.read(), "model config")
        # a model saved before the position-bias term existed was trained without it
        raw.setdefault("position_bias", False)
        raw.setdefault("use_item_duration", False)  # likewise for the item-duration feature
        raw.setdefault("interest_intensity_units", 0)  # and for the FAU's intensity pools
        return cls.from_dict(raw)


def _parse_json_object(text: str, what: str) -> Dict:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(raw).__name__}")
    return raw


def read_overrides(json_or_path: str) -> Dict:
    """The JSON object of a `--config` argument: inline JSON, or the path of a .json file."""
    text = json_or_path.strip()
    if not text.startswith("{"):
        import tensorflow as tf

        if not tf.io.gfile.exists(text):
            raise ValueError(f"--config {json_or_path!r} is neither a JSON object nor an "
                             f"existing file")
        with tf.io.gfile.GFile(text) as f:
            text = f.read()
    return _parse_json_object(text, f"config {json_or_path[:60]!r}")


_PRESETS = {
    "qin": dict(model_type="qin"),
    "qin_no_stage1": dict(model_type="qin", use_stage1=False),
    "qin_no_stage2": dict(model_type="qin", use_stage2=False),
    "qin_no_engagement": dict(model_type="qin", use_engagement_weighting=False),
    "qin_id_only": dict(model_type="qin", attention_fields="id"),
    "dnn": dict(model_type="dnn", use_real_time=False),
    "din": dict(model_type="din"),
    "sim_hard": dict(model_type="sim_hard"),
    "sim_soft": dict(model_type="sim_soft"),
    "twin": dict(model_type="twin"),
}
PRESETS = tuple(_PRESETS)


def preset(name: str) -> ModelConfig:
    """The named configuration (see the module docstring); a fresh object on every call."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**_PRESETS[name]).validate()


def resolve(name: str, override: Optional[str] = None) -> ModelConfig:
    """`preset(name)` with the trainer's `--config` JSON (string or file) applied on top."""
    return preset(name).override(override)
