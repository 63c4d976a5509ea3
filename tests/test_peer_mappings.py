"""How timm's LAMB and LARS switches map to keras_lamb's arguments (the
table in docs/algorithms.md), each checked against a NumPy copy of timm's
equations (timm/optim/lamb.py `_single_tensor_lamb`, timm/optim/lars.py
`_single_tensor_lars`), stepped in lockstep. Backend-agnostic: also rerun on
JAX and torch."""

import keras
import numpy as np
import pytest

import keras_lamb
from conftest import (TOLERANCES, VARIABLE_SPECS, make_gradients,
                      make_variables, run_lockstep)

# The variables of conftest.VARIABLE_SPECS whose path holds "bias" are the
# ones a timm param group with weight_decay=0 would hold.
NO_DECAY = "bias"


def no_decay_mask():
    return [NO_DECAY in f"{scope}/{name}" for scope, name, *_ in VARIABLE_SPECS]


def _trust(w_norm, g_norm, ratio):
    return ratio if w_norm > 0 and g_norm > 0 else 1.0


class TimmLamb:
    """timm's Lamb (grad_averaging, bias correction, coupled decay)."""

    def __init__(self, lr, weight_decay, eps=1e-6, betas=(0.9, 0.999),
                 max_grad_norm=1.0, trust_clip=False, always_adapt=False):
        self.__dict__.update(locals())
        self.t, self.m, self.v = 0, None, None

    def step(self, weights, grads):
        b1, b2 = self.betas
        self.t += 1
        if self.m is None:
            self.m = [np.zeros_like(w) for w in weights]
            self.v = [np.zeros_like(w) for w in weights]
        if self.max_grad_norm is not None:
            norm = np.sqrt(sum(np.sum(g * g) for g in grads))
            grads = [g / max(norm / self.max_grad_norm, 1.0) for g in grads]
        out = []
        for i, (w, g) in enumerate(zip(weights, grads)):
            wd = 0.0 if no_decay_mask()[i] else self.weight_decay
            self.m[i] = self.m[i] + (1 - b1) * (g - self.m[i])  # lerp
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            denom = np.sqrt(self.v[i]) / np.sqrt(1 - b2 ** self.t) + self.eps
            update = self.m[i] / (1 - b1 ** self.t) / denom
            if wd:
                update = update + wd * w
            if wd != 0 or self.always_adapt:
                w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(update)
                ratio = _trust(w_norm, u_norm, w_norm / max(u_norm, 1e-300))
                if self.trust_clip:
                    ratio = min(ratio, 1.0)
                update = update * ratio
            out.append(w - self.lr * update)
        return out


class TimmLars:
    """timm's Lars: the rate outside the momentum buffer, which starts as
    the first step's gradient."""

    def __init__(self, lr, weight_decay, momentum=0.9, trust_coeff=1e-3,
                 eps=1e-8, nesterov=False, trust_clip=False,
                 always_adapt=False):
        self.__dict__.update(locals())
        self.buf = None

    def step(self, weights, grads):
        first = self.buf is None
        if first:
            self.buf = [None] * len(weights)
        out = []
        for i, (w, g) in enumerate(zip(weights, grads)):
            wd = 0.0 if no_decay_mask()[i] else self.weight_decay
            if wd != 0 or self.always_adapt:
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                ratio = _trust(w_norm, g_norm, self.trust_coeff * w_norm / (
                    g_norm + w_norm * wd + self.eps))
                if self.trust_clip:
                    ratio = min(ratio / self.lr, 1.0)
                g = (g + wd * w) * ratio
            if first:
                self.buf[i] = g.copy()
            else:
                self.buf[i] = self.momentum * self.buf[i] + g
            d = g + self.momentum * self.buf[i] if self.nesterov else (
                self.buf[i])
            out.append(w - self.lr * d)
        return out


@pytest.mark.parametrize("timm_kwargs", [
    {},  # timm's defaults: max_grad_norm=1.0, always_adapt=False
    dict(always_adapt=True, max_grad_norm=None, trust_clip=True),
], ids=["timm_defaults", "always_adapt_trust_clip_no_clipping"])
def test_timm_lamb_maps_to_keras_lamb(timm_kwargs):
    lr, wd = 0.05, 0.1
    reference = TimmLamb(lr, wd, **timm_kwargs)
    optimizer = keras_lamb.LAMB(
        lr, weight_decay=wd, epsilon=1e-6,
        exclude_from_weight_decay=NO_DECAY,
        # timm adapts a group without weight decay only with always_adapt.
        exclude_from_layer_adaptation=(
            None if timm_kwargs.get("always_adapt") else NO_DECAY),
        # max_grad_norm (on by default in timm) is global_clipnorm.
        global_clipnorm=timm_kwargs.get("max_grad_norm", 1.0),
        clip_trust_ratio=timm_kwargs.get("trust_clip", False))
    run_lockstep(optimizer, reference)


def test_timm_lamb_default_clipping_is_not_keras_lamb_default():
    # Negative control: timm clips the global gradient norm at 1 by
    # default, keras_lamb does not clip unless asked (the gradients here
    # have a global norm far above 1).
    optimizer = keras_lamb.LAMB(0.05, weight_decay=0.1, epsilon=1e-6,
                                exclude_from_weight_decay=NO_DECAY,
                                exclude_from_layer_adaptation=NO_DECAY)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        run_lockstep(optimizer, TimmLamb(0.05, 0.1))


@pytest.mark.parametrize("timm_kwargs", [
    {}, dict(nesterov=True), dict(trust_clip=True, always_adapt=True)],
    ids=["plain", "nesterov", "larc_always_adapt"])
def test_timm_lars_maps_to_keras_lars_at_a_constant_rate(timm_kwargs):
    lr, wd = 0.5, 0.01
    reference = TimmLars(lr, wd, trust_coeff=0.02, **timm_kwargs)
    optimizer = keras_lamb.LARS(
        lr, weight_decay=wd, trust_coefficient=0.02, epsilon=1e-8,
        nesterov=timm_kwargs.get("nesterov", False),
        clip_trust_ratio=timm_kwargs.get("trust_clip", False),
        exclude_from_weight_decay=NO_DECAY,
        exclude_from_layer_adaptation=(
            None if timm_kwargs.get("always_adapt") else NO_DECAY))
    run_lockstep(optimizer, reference)


def test_timm_lars_keeps_the_rate_outside_the_momentum_buffer():
    # keras_lamb (MLPerf, apex) puts lr into the buffer, v = m v + lr r g,
    # and timm multiplies the buffer by the current lr: the same updates at
    # a constant rate (above), different ones once the rate changes.
    def run(rates):
        variables = make_variables()
        optimizer = keras_lamb.LARS(
            rates[0], weight_decay=0.01, trust_coefficient=0.02,
            epsilon=1e-8, exclude_from_weight_decay=NO_DECAY,
            exclude_from_layer_adaptation=NO_DECAY)
        reference = TimmLars(rates[0], 0.01, trust_coeff=0.02)
        weights = [np.array(v, dtype="float64") for v in variables]
        for step, rate in enumerate(rates):
            optimizer.learning_rate = rate
            reference.lr = rate
            grads = make_gradients(step)
            optimizer.apply([keras.ops.convert_to_tensor(g, "float32")
                             for g in grads], variables)
            weights = reference.step(weights, grads)
        return max(float(np.max(np.abs(np.array(v) - w)))
                   for v, w in zip(variables, weights))

    tol = TOLERANCES["float32"]["atol"]
    assert run([0.5, 0.5, 0.5]) < 10 * tol
    assert run([0.5, 0.05, 0.005]) > 1e3 * tol
