"""The QIN ranking model and its baselines in one Keras model, selected by `ModelConfig`.

QIN follows Guo et al., "Query-dominant User Interest Network for Large-Scale Search Ranking"
(CIKM 2023, arXiv 2310.06444) inside the PR2 ranking stage (arXiv 2409.11281):

    request side (once per request)          candidate side (per candidate, independently)
    -------------------------------          ---------------------------------------------
    user / profile / query towers            item id, author, categories, content embedding
    RSU stage 1: top-K1 long-term            RSU stage 2: top-K2 of stage 1 by target cosine
      behaviours by query cosine             FAU over the K2 -> long-term interest
    real-time self-attention                 target attention over real-time behaviours
                                             MMOE head -> p(task) per task, fused score

Input: the dict of `common.features.parse_examples` (request tensors [B, ...], candidate
tensors [B, N]); labels are ignored by `call` and used by `compute_loss`. Output dict:
`<task>` probabilities [B, N], `score` [B, N], `rsu_selected_index` int32 [B, N, K2]
(long-term positions kept for each candidate, ordered by attention weight, -1 where none) and
`rsu_selected_weight` [B, N, K2] (their attention weights). Values at padded candidate slots
(beyond `num_candidates`) are finite but meaningless. Only stock TensorFlow ops are used.

Loss (TFRS `Ranking` task per task, reused rather than rewritten): sum over tasks of
w_t * loss_t averaged over the valid candidates of the batch, so
`model.compile(optimizer); model.fit(dataset)` just works. Binary tasks: binary cross-entropy
with masked AUC metrics `<task>_auc`. Watch time (`common.features.WATCH_TIME`, when the data
has it): the output is the expected play time per impression in seconds, learned by Poisson
regression or YouTube's weighted logistic regression (`ModelConfig.watch_time_loss`).

Position bias (data that keeps the display order, `ModelConfig.position_bias`): the loss adds
a learned per-task logit of each candidate's display position (`training_logits`); `call` and
so evaluation, calibration and serving never add it (scored at position 0, which has bias 0), and
no position input is needed to serve. Without display order no position weights exist.

Every head's output then passes through `trainer.calibration.CalibrationLayer`, the identity
until `python -m trainer.objectives` fits it on eval; the fused score is computed from the
calibrated outputs with the weights of the config, or the tuned ones stored with the model
(`trainer.post_training`).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from common import features as F
from trainer.calibration import CalibrationLayer
from trainer.config import ModelConfig
from trainer.layers import masking
from trainer.layers.embeddings import FeatureEmbeddings, behaviour_cross_features
from trainer.layers.mmoe import MMoE
from trainer.layers.relevance_search import cosine

FINAL_WEIGHTS_DIR = "final"  # model_dir/final/<prefix>: model.save_weights, TF format
FINAL_WEIGHTS_PREFIX = "weights"
_PROB_EPSILON = 1e-7
_WATCH_TIME_LOGIT_RANGE = (-30.0, 15.0)  # keeps exp(logit) finite in float32




# Cosine along the last axis, 0 for zero vectors: the RSU's, whose float32 result does not
# depend on the batch around it.
cosine_similarity = cosine


class Behaviours:
    """The fields of one behaviour sequence, with the validity mask from its explicit length."""

    def __init__(self, features, sequence, dtype=tf.float32):
        def field(name):
            return features[F.seq_feature(sequence, name)]

        self.item = field(F.SEQ_ITEM)
        self.author = field(F.SEQ_AUTHOR)
        self.category = field(F.SEQ_CATEGORY)
        self.length = tf.shape(self.item)[1]
        self.mask = masking.length_mask(tf.reshape(field(F.SEQ_LENGTH), [-1]), self.length)
        self.cross = behaviour_cross_features(field(F.SEQ_ENGAGEMENT), field(F.SEQ_SOURCE),
                                              field(F.SEQ_TIME_GAP), self.mask)
        self.cross = tf.cast(self.cross, dtype)


class RankingModel(tfrs.models.Model):
    """QIN and its baselines: see the module docstring and `trainer.config`."""

    def __init__(self, config: ModelConfig, metadata: F.DatasetMetadata, item_embeddings,
                 item_durations=None, **kwargs):
        super().__init__(name=kwargs.pop("name", f"{config.model_type}_ranking"), **kwargs)
        config = config.resolved_for(metadata)  # K1 / threshold of stage-1 data, or a refusal
        config.check_tasks(metadata.tasks)
        self.config = config
        self.metadata = metadata
        self.tasks = list(metadata.tasks)
        self.score_weights = config.score_weight_map(self.tasks)
        c = config
        # the duration feature (trainer.config docstring) exists only when the data gives
        # durations, the config asks for it and the caller passed the table
        self.uses_item_duration = bool(c.use_item_duration and metadata.item_durations
                                       and item_durations is not None)
        self.embeddings = FeatureEmbeddings(
            metadata, item_embeddings, c.id_embedding_dim, l2=c.l2_regularization,
            item_durations=item_durations if self.uses_item_duration else None,
            name="embeddings")
        self.request_tower = tf.keras.layers.Dense(c.hidden_units, activation="relu",
                                                   name="request_tower")
        self.candidate_tower = tf.keras.layers.Dense(c.hidden_units, activation="relu",
                                                     name="candidate_tower")
        self.long_term_unit = self._build_long_term_unit() if c.uses_long_term else None
        self.real_time_unit = self._build_real_time_unit() if c.uses_real_time else None
        self.head = MMoE(self.tasks, c.num_experts, c.expert_units, c.tower_units, c.dropout,
                         name="mmoe")
        self.ranking_tasks = {task: self._ranking_task(task) for task in self.tasks}
        self.calibration = CalibrationLayer(self.tasks, dtype="float32", name="calibration")
        # training only, and only when the data keeps the display order: no weights otherwise
        self.uses_position_bias = bool(c.position_bias and metadata.display_order)
        self.position_bias = (tf.keras.layers.Embedding(
            c.position_buckets, len(self.tasks), embeddings_initializer="zeros",
            dtype="float32", name="position_bias") if self.uses_position_bias else None)
        if self.position_bias is not None:
            # built now: `call` never reads it, and a restore must find its variable
            self.position_bias.build((None,))
        # a tracked metric: fit() resets it at every epoch start (see train_step)
        self.epoch_loss = tf.keras.metrics.Mean(name="epoch_loss")

    def _ranking_task(self, task):
        sum_reduction = tf.keras.losses.Reduction.SUM
        if F.is_binary_task(task) or self.config.watch_time_loss == "weighted_logistic":
            metrics = ([tf.keras.metrics.AUC(from_logits=True, name=f"{task}_auc")]
                       if F.is_binary_task(task) else [])
            return tfrs.tasks.Ranking(
                loss=tf.keras.losses.BinaryCrossentropy(from_logits=True,
                                                        reduction=sum_reduction),
                metrics=metrics, name=f"{task}_task")
        return tfrs.tasks.Ranking(
            loss=tf.keras.losses.Poisson(reduction=sum_reduction),
            metrics=[tf.keras.metrics.MeanAbsoluteError(name=f"{task}_mae_scaled")],
            name=f"{task}_task")

    def initialize_output_bias(self, label_means: Dict[str, float]) -> Dict[str, float]:
        """Sets each head's final bias so that the untrained model predicts the train split's
        mean label (the usual base-rate initialisation of an output bias): a binary task starts
        at logit(rate), the Poisson watch-time head at log(mean / scale). Without it the heads
        start at 0.5 and at `watch_time_scale_s` seconds and spend the first steps (and, on
        small data, whole epochs) moving their level. The weighted-logistic watch-time head is
        left at 0. Returns the biases set."""
        biases = {}
        for task in self.tasks:
            if task not in label_means:
                continue
            mean = float(label_means[task])
            if F.is_binary_task(task):
                rate = min(max(mean, 1e-4), 1.0 - 1e-4)
                biases[task] = float(np.log(rate / (1.0 - rate)))
            elif self.config.watch_time_loss == "poisson":
                biases[task] = float(np.log(max(mean, 1e-3) / self.config.watch_time_scale_s))
        for task, value in biases.items():
            bias = self.head.heads[task].bias
            bias.assign(tf.fill(bias.shape, tf.constant(value, bias.dtype)))
        return biases

    def set_score_weights(self, weights: Dict[str, float]) -> None:
        """Replaces the fused score's task weights (e.g. the ones tuned on eval)."""
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"score weights name tasks {unknown} the model does not have")
        self.score_weights = {t: float(weights.get(t, 0.0)) for t in self.tasks}

    def _head_outputs(self, logits):
        """Uncalibrated outputs: probabilities, and the expected watch time in seconds."""
        outputs = {t: tf.sigmoid(logits[t]) for t in self.tasks if F.is_binary_task(t)}
        scale = self.config.watch_time_scale_s
        for task in F.regression_tasks(self.tasks):
            expected = scale * tf.exp(tf.clip_by_value(logits[task], *_WATCH_TIME_LOGIT_RANGE))
            if self.config.watch_time_loss == "weighted_logistic" and "click" in outputs:
                expected = expected * (1.0 - outputs["click"])  # odds * P(no play)
            outputs[task] = expected
        return outputs

    # ---- unit construction -----------------------------------------------------------------
    def _build_long_term_unit(self):
        c = self.config
        if c.model_type == "qin":
            from trainer.layers.fused_attention import FusedAttentionUnit
            from trainer.layers.relevance_search import RelevanceSearchUnit

            self.rsu = RelevanceSearchUnit(
                k1=c.k1, k2=c.k2, threshold=c.relevance_threshold, use_stage1=c.use_stage1,
                use_stage2=c.use_stage2,
                precomputed_stage1=self.metadata.long_term_mode == "stage1", name="rsu")
            self.interest_centroids = None
            if c.interest_centroid_units:
                from trainer.layers.interest_centroids import InterestCentroids

                self.interest_centroids = InterestCentroids(
                    c.interest_centroid_units, c.use_engagement_weighting,
                    name="interest_centroids")
            return FusedAttentionUnit(
                hidden_units=c.hidden_units, attention_units=c.attention_units,
                attention_fields=c.attention_fields, fusion_lambda=c.fusion_lambda,
                use_engagement_weighting=c.use_engagement_weighting,
                intensity_units=c.interest_intensity_units, name="fau")
        if c.model_type in ("sim_hard", "sim_soft"):
            from trainer.layers.sim import SimSearchUnit

            return SimSearchUnit(mode=c.model_type[len("sim_"):], k=c.k2,
                                 hidden_units=c.hidden_units, num_heads=c.num_heads,
                                 category_level=c.sim_category_level, name="sim")
        if c.model_type == "twin":
            from trainer.layers.twin import TwinUnit

            return TwinUnit(k=c.k2, hidden_units=c.hidden_units,
                            attention_units=c.attention_units, num_heads=c.num_heads, name="twin")
        raise ValueError(f"model_type {c.model_type!r} has no long-term unit")

    def _build_real_time_unit(self):
        c = self.config
        if c.model_type == "din":
            from trainer.layers.din import DinAttention

            return DinAttention(hidden_units=c.hidden_units, attention_units=c.attention_units,
                                name="din")
        from trainer.layers.real_time import RealTimeUnit

        return RealTimeUnit(hidden_units=c.hidden_units, num_heads=c.num_heads,
                            attention_units=c.attention_units,
                            max_length=max(self.metadata.real_time_length, 1),
                            dropout=c.dropout, name="real_time")

    # ---- forward ---------------------------------------------------------------------------
    def _request_vector(self, features):
        e = self.embeddings
        batch = tf.shape(features[F.QUERY_EMBEDDING])[0]
        user = e.lookup("user", tf.reshape(features[F.USER_INDEX], [-1]))
        profile = tf.reshape(e.lookup("profile", features[F.USER_PROFILE]),
                             [batch, F.USER_PROFILE_DIM * e.dim])
        tokens = features[F.QUERY_TOKENS]
        token_mask = masking.length_mask(tf.reshape(features[F.QUERY_LENGTH], [-1]),
                                         tf.shape(tokens)[1])
        query_tokens = masking.masked_mean(e.lookup("query_token", tokens), token_mask, axis=1)
        query_embedding = tf.cast(features[F.QUERY_EMBEDDING], self.compute_dtype)
        return self.request_tower(tf.concat([user, profile, query_tokens, query_embedding], -1))

    def _forward(self, features, training=False):
        missing = [n for n in F.model_input_names(self.metadata) if n not in features]
        if missing:
            raise ValueError(f"model input lacks features {missing}; build inputs with "
                             f"common.features.parse_examples")
        c, e = self.config, self.embeddings
        cand_item = features[F.CANDIDATE_ITEM]
        cand_author = features[F.CANDIDATE_AUTHOR]
        cand_category = features[F.CANDIDATE_CATEGORY]
        batch, num_cand = tf.shape(cand_item)[0], tf.shape(cand_item)[1]
        dtype = self.compute_dtype  # float16 under mixed precision; outputs stay float32
        # A query embedding of the wrong width fails here, naming the expected width.
        query_embedding = tf.ensure_shape(tf.cast(features[F.QUERY_EMBEDDING], tf.float32),
                                          [None, self.metadata.embedding_dim])

        target_id = e.id_field(cand_item, cand_author)  # [B, N, 2d]
        target_attr = e.attribute_field(cand_item, cand_category)  # [B, N, LEVELS*d + D]
        target_content = e.content(cand_item, tf.float32)  # [B, N, D], relevance in float32
        query_relevance = tf.cast(
            cosine_similarity(query_embedding[:, tf.newaxis, :], target_content), dtype)

        request = self._request_vector(features)  # [B, H]
        parts = [tf.broadcast_to(request[:, tf.newaxis, :], [batch, num_cand, c.hidden_units]),
                 self.candidate_tower(tf.concat([target_id, target_attr], -1)),
                 query_relevance[..., tf.newaxis]]
        if self.uses_item_duration:
            parts.append(e.duration(cand_item))  # [B, N, 2]

        selected_index = tf.fill([batch, num_cand, c.k2], tf.constant(-1, tf.int32))
        selected_weight = tf.zeros([batch, num_cand, c.k2], tf.float32)
        if self.long_term_unit is not None:
            long = Behaviours(features, F.LONG_TERM, dtype)
            interest, positions, weights = self._long_term(
                long, query_embedding, cand_item, cand_category, target_id, target_attr,
                target_content, training)
            parts.append(interest)
            selected_index, selected_weight = self._explanation(positions, weights)
        if self.real_time_unit is not None:
            rt = Behaviours(features, F.REAL_TIME, dtype)
            rt_tokens = tf.concat([e.id_field(rt.item, rt.author),
                                   e.attribute_field(rt.item, rt.category), rt.cross], -1)
            target = tf.concat([target_id, target_attr], -1)
            rt_interest, _ = self.real_time_unit(rt_tokens, rt.mask, target, training=training)
            parts.append(rt_interest)

        logits, _ = self.head(tf.concat(parts, axis=-1), training=training)
        logits = {task: tf.cast(logit, tf.float32) for task, logit in logits.items()}
        raw = self._head_outputs(logits)
        outputs = {task: self.calibration(task, raw[task]) for task in self.tasks}
        outputs[F.SCORE] = self._score(outputs)
        outputs[F.RSU_SELECTED_INDEX] = selected_index
        outputs[F.RSU_SELECTED_WEIGHT] = selected_weight
        return outputs, logits

    def _long_term(self, long, query_embedding, cand_item, cand_category, target_id,
                   target_attr, target_content, training):
        """Long-term interest [B, N, H] plus the positions [B, N, K] and weights [B, N, K] of
        the behaviours it attended to."""
        c, e = self.config, self.embeddings
        if c.model_type == "qin":
            content = e.content(long.item, tf.float32)  # [B, L, D], selection in float32
            stage1_pos, stage1_valid = self.rsu.stage1(query_embedding, content, long.mask)
            s1 = lambda x: masking.gather_positions(x, stage1_pos)  # noqa: E731
            stage1_content = s1(content)
            idx, valid, relevance = self.rsu.stage2_scored(target_content, stage1_content,
                                                           stage1_valid)
            interest, weights = self.long_term_unit(
                target_id, target_attr,
                e.id_field(s1(long.item), s1(long.author)),
                e.attribute_field(s1(long.item), s1(long.category)),
                s1(long.cross), idx, valid, relevance=relevance, training=training)
            if self.interest_centroids is not None:
                interest = tf.concat([interest, self.interest_centroids(
                    target_content, cand_category[..., 0], stage1_content,
                    s1(long.category)[..., 0], s1(long.cross), stage1_valid)], axis=-1)
            positions = masking.gather_positions(stage1_pos, idx)
            return interest, tf.where(valid, positions, -1), weights
        behaviour_id = e.id_field(long.item, long.author)
        behaviour_attr = e.attribute_field(long.item, long.category)
        if c.model_type in ("sim_hard", "sim_soft"):
            return self.long_term_unit(target_id, target_attr, cand_category, behaviour_id,
                                       behaviour_attr, long.category, long.cross, long.mask,
                                       training=training)
        return self.long_term_unit(tf.concat([target_id, target_attr], -1),
                                   tf.concat([behaviour_id, behaviour_attr], -1), long.cross,
                                   long.mask, training=training)

    def _explanation(self, positions, weights):
        """The K2 highest-weighted attended positions, -1 / 0 where there are fewer."""
        k2 = self.config.k2
        weights = tf.cast(weights, tf.float32)
        valid = positions >= 0
        order, kept = masking.masked_top_k(weights, valid, k2)
        top_positions = tf.where(kept, tf.gather(positions, order, batch_dims=2), -1)
        top_weights = tf.where(kept, tf.gather(weights, order, batch_dims=2), 0.0)
        return (masking.pad_last_dim(tf.cast(top_positions, tf.int32), k2, -1),
                masking.pad_last_dim(top_weights, k2, 0.0))

    def _score(self, probabilities):
        weights = self.score_weights
        if self.config.score_formula == "sum":
            return tf.add_n([w * probabilities[t] for t, w in weights.items()])
        logs = [w * tf.math.log(tf.maximum(probabilities[t], _PROB_EPSILON))
                for t, w in weights.items() if w]
        if not logs:
            return tf.ones_like(probabilities[self.tasks[0]])
        return tf.exp(tf.add_n(logs))

    def call(self, features, training=False):
        """Outputs as served: without the position-bias term (scored at position 0)."""
        outputs, _ = self._forward(features, training=training)
        return outputs

    def position_logits(self, features):
        """{task: [B, N] float32} bias of each candidate's display position, 0 at position 0
        and where the position is unknown (POSITION_UNKNOWN or no position feature); None when
        the model has no position-bias term."""
        if self.position_bias is None:
            return None
        if F.CANDIDATE_POSITION not in features:
            return None
        position = tf.cast(features[F.CANDIDATE_POSITION], tf.int32)
        known = position >= 0
        bucket = tf.clip_by_value(position, 0, self.config.position_buckets - 1)
        bias = self.position_bias(bucket) - self.position_bias(tf.zeros_like(bucket))
        bias = tf.where(known[..., tf.newaxis], bias, 0.0)  # [B, N, tasks]
        return {task: bias[..., k] for k, task in enumerate(self.tasks)}

    def training_logits(self, features, training=False):
        """Head logits the loss sees: the served model's plus, when the data keeps the display
        order, the learned bias of each candidate's position (trainer.config docstring)."""
        _, logits = self._forward(features, training=training)
        bias = self.position_logits(features)
        if bias is None:
            return logits
        return {task: logits[task] + bias[task] for task in self.tasks}

    # ---- loss and training step -------------------------------------------------------------
    def compute_loss(self, features, training=False):
        """Mean weighted loss of this batch (one replica's share under a distribution strategy;
        `train_step` divides by the number of replicas before taking gradients)."""
        missing = [F.label_feature(t) for t in self.tasks if F.label_feature(t) not in features]
        if missing:
            raise ValueError(f"batch has no labels {missing}: parse with with_labels=True")
        logits = self.training_logits(features, training=training)
        mask = tf.reshape(tf.cast(F.candidate_mask(features), tf.float32), [-1])
        num_valid = tf.maximum(tf.reduce_sum(mask), 1.0)
        total = 0.0
        scale = self.config.watch_time_scale_s
        for task in self.tasks:
            labels = tf.reshape(tf.cast(features[F.label_feature(task)], tf.float32), [-1, 1])
            predictions = tf.reshape(logits[task], [-1, 1])
            weight = mask
            if not F.is_binary_task(task):
                scaled = labels / scale
                if self.config.watch_time_loss == "weighted_logistic":
                    # positives: played candidates weighted by T / s; negatives: weight 1
                    played = tf.cast(scaled > 0, tf.float32)
                    weight = mask * tf.reshape(tf.where(scaled > 0, scaled, 1.0), [-1])
                    labels = played
                else:
                    labels = scaled
                    predictions = tf.exp(tf.clip_by_value(predictions, *_WATCH_TIME_LOGIT_RANGE))
            task_loss = self.ranking_tasks[task](
                labels=labels, predictions=predictions, sample_weight=weight,
                training=training)
            total += self.config.loss_weight(task) * task_loss / num_valid
        return total

    def train_step(self, inputs):
        """One optimisation step, correct under tf.distribute and mixed precision.

        `compute_loss` returns the mean loss of the batch one replica sees. Optimisers sum
        gradients over replicas, so the loss is divided by the number of replicas in sync to make
        the update the gradient of the global mean (TFRS's generic step does not); under
        mixed_float16 the loss is scaled (and the gradients unscaled) by the LossScaleOptimizer.
        Logs: every metric, `batch_loss`, `regularization_loss` and `loss`, the mean over the
        epoch so far (fit() resets `epoch_loss` at every epoch start).
        """
        loss_scale_type = tf.keras.mixed_precision.LossScaleOptimizer
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        with tf.GradientTape() as tape:
            loss = self.compute_loss(inputs, training=True)
            regularization = tf.reduce_sum([tf.reduce_sum(x) for x in self.losses])
            total = tf.cast(loss, tf.float32) + tf.cast(regularization, tf.float32)
            scaled = total / replicas
            if isinstance(self.optimizer, loss_scale_type):
                scaled = self.optimizer.get_scaled_loss(scaled)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        if isinstance(self.optimizer, loss_scale_type):
            gradients = self.optimizer.get_unscaled_gradients(gradients)
        self.optimizer.apply_gradients(zip(gradients, variables))
        self.epoch_loss.update_state(total)
        logs = {m.name: m.result() for m in self.metrics}
        logs.update(batch_loss=loss, regularization_loss=regularization)
        logs["loss"] = self.epoch_loss.result()
        return logs


def build_model(config: ModelConfig, metadata: F.DatasetMetadata, item_embeddings,
                item_durations=None) -> RankingModel:
    """The ranking model for `config` (a `trainer.config.ModelConfig`) on a dataset described by
    `metadata`, with `item_embeddings` ([num_items + 1, D]) as its frozen content table and
    `item_durations` ([num_items + 1] seconds, `load_item_durations`) as its duration table.
    The model's variables are created on its first call (see `dummy_features`)."""
    return RankingModel(config, metadata, item_embeddings, item_durations)


def load_item_durations(data_dir: str, metadata: F.DatasetMetadata):
    """`data_dir/item_durations.npy` when metadata.json says the log gave durations, else None."""
    if not metadata.item_durations:
        return None
    path = os.path.join(data_dir, F.ITEM_DURATIONS_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path} not found although metadata.json says the items have "
                                f"durations: is {data_dir} a complete preprocessing output?")
    with tf.io.gfile.GFile(path, "rb") as f:
        return np.load(f)


def dummy_features(metadata: F.DatasetMetadata, batch_size=1, num_candidates=1,
                   with_labels=False) -> Dict[str, tf.Tensor]:
    """A well-formed all-padding input batch of `common.features.dense_layout` (used to create
    the model's variables and to trace signatures)."""
    out = {}
    for name, dense in F.dense_layout(metadata, with_labels=with_labels).items():
        shape = [batch_size] + [num_candidates if d is None else d for d in dense.shape[1:]]
        out[name] = tf.zeros(shape, tf.as_dtype(dense.dtype)) if dense.dtype != "string" \
            else tf.fill(shape, "")
    out[F.NUM_CANDIDATES] = tf.fill([batch_size], tf.constant(num_candidates, tf.int64))
    return out


def final_weights_path(model_dir: str) -> str:
    """Where the trainer saves the final weights: `model_dir/final/weights` (TF format)."""
    return os.path.join(model_dir, FINAL_WEIGHTS_DIR, FINAL_WEIGHTS_PREFIX)


def load_trained_model(model_dir: str, data_dir: str, config: Optional[ModelConfig] = None
                       ) -> RankingModel:
    """Rebuilds a trained model from `model_dir/model_config.json`, `data_dir/metadata.json` and
    `data_dir/item_embeddings.npy`, and loads the weights saved under `model_dir/final/`."""
    config = config or ModelConfig.load(model_dir)
    metadata = F.DatasetMetadata.load(data_dir)
    embeddings_path = os.path.join(data_dir, F.ITEM_EMBEDDINGS_FILE)
    if not tf.io.gfile.exists(embeddings_path):
        raise FileNotFoundError(f"{embeddings_path} not found: `--data` must be the output "
                                f"directory of `python -m preprocessing`")
    with tf.io.gfile.GFile(embeddings_path, "rb") as f:
        item_embeddings = np.load(f)
    model = build_model(config, metadata, item_embeddings,
                        load_item_durations(data_dir, metadata))
    model(dummy_features(metadata))  # creates the variables before restoring them
    final_dir = os.path.join(model_dir, FINAL_WEIGHTS_DIR)
    checkpoint = tf.train.latest_checkpoint(final_dir) or final_weights_path(model_dir)
    if not tf.io.gfile.exists(checkpoint + ".index"):
        raise FileNotFoundError(
            f"no weights under {final_dir} (expected {final_weights_path(model_dir)}.index, "
            f"written by `model.save_weights(..., save_format='tf')`): has training finished?")
    status = model.load_weights(checkpoint)
    status.assert_existing_objects_matched()
    # The saved optimizer slots are not needed to score or export: say so, instead of a
    # warning per unrestored slot variable.
    status.expect_partial()
    from trainer import post_training

    post_training.apply(model, model_dir)  # calibration and tuned fusion weights, if fitted
    return model
