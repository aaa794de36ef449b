"""Multi-gate Mixture-of-Experts multi-task head.

Follows Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts" (KDD 2018), as used by PR2's ranking stage (arXiv 2409.11281) to predict
click, long view and like from one shared representation:

    e_k = Expert_k(x)                      k = 1..num_experts (shared MLPs)
    g_t = softmax(W_t x)                   one gate per task over the experts
    logit_t = Tower_t(sum_k g_t[k] * e_k)  one MLP tower per task, ending in one logit

Works on any leading shape ([B, N, F] for candidates scored independently).
"""
import tensorflow as tf


def mlp(units, name, dropout=0.0, activation="relu"):
    layers = []
    for i, width in enumerate(units):
        layers.append(tf.keras.layers.Dense(width, activation=activation, name=f"{name}_dense{i}"))
        if dropout:
            layers.append(tf.keras.layers.Dropout(dropout, name=f"{name}_dropout{i}"))
    return tf.keras.Sequential(layers, name=name)


class MMoE(tf.keras.layers.Layer):
    """Returns ({task: logit [...]}, {task: gate weights [..., num_experts]})."""

    def __init__(self, tasks, num_experts=4, expert_units=(64,), tower_units=(32,), dropout=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        if not tasks:
            raise ValueError("MMoE needs at least one task")
        self.tasks = list(tasks)
        self.num_experts = num_experts
        self.experts = [mlp(expert_units, f"expert{k}", dropout) for k in range(num_experts)]
        self.gates = {t: tf.keras.layers.Dense(num_experts, name=f"gate_{t}") for t in self.tasks}
        self.towers = {t: mlp(tower_units, f"tower_{t}", dropout) for t in self.tasks}
        self.heads = {t: tf.keras.layers.Dense(1, name=f"logit_{t}") for t in self.tasks}

    def call(self, inputs, training=None):
        experts = tf.stack([e(inputs, training=training) for e in self.experts], axis=-2)
        logits, gates = {}, {}
        for task in self.tasks:
            gate = tf.nn.softmax(self.gates[task](inputs), axis=-1)  # [..., E]
            mixed = tf.reduce_sum(gate[..., tf.newaxis] * experts, axis=-2)
            hidden = self.towers[task](mixed, training=training)
            logits[task] = tf.squeeze(self.heads[task](hidden), axis=-1)
            gates[task] = gate
        return logits, gates
