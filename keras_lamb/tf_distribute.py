"""Optimizer steps under `tf.distribute` that equal the single-device step.

TensorFlow backend only; imported by `layerwise` when a step runs inside a
strategy's replica context, so the rest of the package needs no TensorFlow.

Keras 3 (3.15) applies gradients under a strategy in this order: clip each
replica's gradient, then all-reduce, then update. Clipping a partial gradient
is not clipping the gradient of the global batch (`global_clipnorm` of a
replica's share hardly ever triggers), so an R-replica run is a different
algorithm from the one-device run with the same global batch. Its gradient
accumulation and EMA also call `merge_call` inside a `cond` taken in the
replica context, which TensorFlow refuses ("merge_call called while defining
a new graph or a tf.function").

`apply_gradients` reorders the step: all-reduce first, then exactly what one
device does with the summed gradient (accumulate or update, clip, EMA), with
every data-dependent branch taken per device inside
`strategy.extended.update`, where no cross-replica call is needed.
"""

import tensorflow as tf
from keras import ops


def in_replica_context():
    """Whether the step runs in the replica context of a (non-default)
    strategy: `strategy.run`, or `Model.fit` under `strategy.scope()`."""
    return (
        tf.distribute.has_strategy()
        and not tf.distribute.in_cross_replica_context()
    )


def dense(gradient):
    """`gradient` as a dense tensor (`tf.IndexedSlices` summed by index).

    LAMB and LARS update every row anyway (the moments and the trust ratio
    see the whole variable); densifying before the clip also makes
    `global_clipnorm`/`clipnorm` measure the norm of the summed gradient
    rather than of its unsummed rows, which overcounts repeated indices.
    """
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


def apply_gradients(optimizer, grads, trainable_variables):
    """The body of `Optimizer.apply` after filtering and loss unscaling, in a
    replica context: all-reduce, then the single-device step.

    `grads` are this replica's gradients of its share of the mean loss (the
    all-reduce sum is the gradient of the global mean loss, as in Keras).
    Gradients are all-reduced on every call, also on the micro-steps of
    gradient accumulation: the accumulators then hold the same sum on every
    replica, as the variables and slots do.
    """
    replica = tf.distribute.get_replica_context()
    grads = replica.all_reduce(
        tf.distribute.ReduceOp.SUM, [dense(g) for g in grads]
    )
    learning_rate = optimizer.learning_rate
    k = optimizer.gradient_accumulation_steps
    if k:
        # As `BaseOptimizer._backend_apply_gradients`: update on every k-th
        # call with the mean of the k gradients, then clip that mean.
        is_update = ops.equal((optimizer._iterations + 1) % k, 0)
        accumulators = [
            optimizer._accumulated_gradients[
                optimizer._get_variable_index(v)
            ]
            for v in trainable_variables
        ]

        def mean_then_clip():
            return optimizer._clip_gradients(
                [(g + a.value) / k for g, a in zip(grads, accumulators)]
            )

        # Pure math in both branches, so it may run in the replica context.
        update_grads = tf.cond(is_update, mean_then_clip, lambda: list(grads))
    else:
        is_update = accumulators = None
        update_grads = optimizer._clip_gradients(grads)
    tf.__internal__.distribute.interim.maybe_merge_call(
        _update_each_device,
        optimizer._distribution_strategy,
        optimizer,
        trainable_variables,
        update_grads,
        grads,
        accumulators,
        is_update,
        learning_rate,
    )


def _update_each_device(distribution, optimizer, trainable_variables,
                        update_grads, grads, accumulators, is_update,
                        learning_rate):
    """Cross-replica: each variable's step on each device.

    Branches (update or accumulate; overwrite with the average or not) are
    `tf.cond`s inside the per-device function, where they hold no
    cross-replica call.
    """
    for index, variable in enumerate(trainable_variables):
        args = (update_grads[index], learning_rate)

        def step(var, grad, lr, *maybe, accumulator=None):
            if accumulator is None:
                optimizer.update_step(grad, var, lr)
                return

            raw_grad, flag = maybe

            def update():
                optimizer.update_step(grad, var, lr)
                accumulator.assign(tf.zeros_like(accumulator))

            def accumulate():
                accumulator.assign_add(raw_grad)

            tf.cond(flag, update, accumulate)

        kwargs = {}
        if accumulators is not None:
            args += (grads[index], is_update)
            kwargs["accumulator"] = accumulators[index].value
        distribution.extended.update(
            _tf_variable(variable), step, args=args, kwargs=kwargs,
            group=False,
        )
    if optimizer.use_ema:
        _update_moving_averages(distribution, optimizer)


def _update_moving_averages(distribution, optimizer):
    """`BaseOptimizer`'s EMA update and periodic overwrite, per device."""
    iterations = optimizer.iterations
    frequency = optimizer.ema_overwrite_frequency
    for variable, average in zip(
        optimizer._trainable_variables,
        optimizer._model_variables_moving_average,
    ):
        if average is None:
            continue

        def ema(average, var):
            # The first step copies the variable (momentum 0), as in Keras.
            momentum = ops.cast(
                ops.not_equal(iterations, 0), var.dtype
            ) * optimizer.ema_momentum
            average.assign(momentum * average + (1 - momentum) * var)
            if frequency:

                def overwrite():
                    var.assign(average)

                tf.cond(
                    ops.equal((iterations + 1) % frequency, 0),
                    overwrite,
                    lambda: None,
                )

        distribution.extended.update(
            _tf_variable(average), ema, args=(_tf_variable(variable),),
            group=False,
        )


def _tf_variable(variable):
    return getattr(variable, "value", variable)
