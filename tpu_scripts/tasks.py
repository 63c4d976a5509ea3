"""The model-specific half of training, shared by both engines.

A `Task` builds the model and metrics, computes per-example losses and
updates metrics, in `keras.ops`, so the same task runs on the TensorFlow
engine (`tpu_scripts.trainer.Trainer`, `tf.distribute`) and on the JAX engine
(`tpu_scripts.jax_trainer.JaxTrainer`, `keras.distribution`). How the loss
is reduced over replicas and micro-batches is the engine's business.
"""

import re

import keras
from keras import ops


class Task:
    """The model-specific half of training. Subclass and override.

    A batch is whatever the input function yields (a tuple or dict of
    tensors: one replica's share on TensorFlow, the global batch on JAX).
    """

    def build_model(self):
        """The `keras.Model` (called inside the engine's distribution)."""
        raise NotImplementedError

    def build_metrics(self):
        """A dict `{name: keras.metrics.Metric}`."""
        return {}

    def compute_loss(self, model, batch, training):
        """`(per_example_loss [batch], outputs)`.

        Padding examples (evaluation) must already carry zero loss.
        """
        raise NotImplementedError

    def example_weights(self, batch):
        """Per-example weights for the loss metric (`None`: all ones)."""
        return None

    def regularization_loss(self, model):
        """A scalar added to the loss once per global batch, or `None`."""
        return None

    def update_metrics(self, metrics, batch, outputs):
        """Updates the task's metrics with one batch."""


class ClassificationTask(Task):
    """Softmax classification on `(images, labels[, weights])` batches.

    Args:
        model_fn: builds the model, which returns logits.
        num_classes: number of classes.
        label_smoothing: float in [0, 1).
        l2_weight_decay: coefficient of `0.5 * l2 * sum(w**2)` added to the
            loss (coupled weight decay, as in Goyal et al.; use it with SGD
            optimizers, not with LARS/LAMB/AdamW, which decay internally).
        l2_exclude: regular expression of variable paths the L2 term skips.
    """

    def __init__(self, model_fn, num_classes, label_smoothing=0.0,
                 l2_weight_decay=0.0, l2_exclude=None):
        self.model_fn = model_fn
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.l2_weight_decay = l2_weight_decay
        self.l2_exclude = re.compile(l2_exclude) if l2_exclude else None

    def build_model(self):
        return self.model_fn()

    def build_metrics(self):
        return {"accuracy": keras.metrics.SparseCategoricalAccuracy("accuracy")}

    def compute_loss(self, model, batch, training):
        images, labels = batch[0], batch[1]
        logits = ops.cast(model(images, training=training), "float32")
        one_hot = ops.one_hot(labels, self.num_classes, dtype="float32")
        targets = (one_hot * (1 - self.label_smoothing)
                   + self.label_smoothing / self.num_classes)
        loss = ops.categorical_crossentropy(targets, logits, from_logits=True)
        weights = self.example_weights(batch)
        if weights is not None:
            loss = loss * weights
        return loss, logits

    def example_weights(self, batch):
        return batch[2] if len(batch) > 2 else None

    def regularization_loss(self, model):
        if not self.l2_weight_decay:
            return None
        penalties = [
            ops.sum(ops.square(ops.cast(v.value, "float32"))) / 2
            for v in model.trainable_variables
            if not (self.l2_exclude and self.l2_exclude.search(v.path))
        ]
        return self.l2_weight_decay * sum(penalties[1:], penalties[0])

    def update_metrics(self, metrics, batch, outputs):
        metrics["accuracy"].update_state(
            batch[1], outputs, sample_weight=self.example_weights(batch)
        )
